"""Model families. Each file holds one family; `family_for` picks one by name."""
from finetune.models.base import Components, ModelFamily, ModelLoadError


def family_for(name: str) -> ModelFamily:
    # "auto" means Stable Diffusion 1.x/2.x until more families arrive
    if name in ("auto", "sd"):
        from finetune.models.stable_diffusion import StableDiffusion
        return StableDiffusion()
    raise ValueError(f"unknown model family {name!r}")


__all__ = ["Components", "ModelFamily", "ModelLoadError", "family_for"]
