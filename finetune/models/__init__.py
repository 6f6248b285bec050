"""Model families. Each file holds one family; `family_for` picks one by name."""
from __future__ import annotations

from typing import Any

_FROM_BASE = ("Components", "ModelFamily", "ModelLoadError")


def family_for(name: str, base: str | None = None) -> Any:
    """The family called `name` ("auto": told from `base` where it can be, finetune/models/detect.py; raises
    UnsupportedFamily, a ValueError naming it, for a base of a family not trained here)."""
    if name == "auto" and base is not None:
        from finetune.models.detect import family_of

        name = family_of(base) or "sd"  # a hub id or .ckpt: Stable Diffusion 1.x/2.x, the one family so far
    if name in ("auto", "sd"):
        from finetune.models.stable_diffusion import StableDiffusion
        return StableDiffusion()
    raise ValueError(f"unknown model family {name!r}")


def __getattr__(name: str) -> Any:
    # loaded on first use, so that recipe checks can read model folders (pipeline_folder.py) without torch
    if name in _FROM_BASE:
        from finetune.models import base

        return getattr(base, name)
    raise AttributeError(f"module 'finetune.models' has no attribute {name!r}")


__all__ = [*_FROM_BASE, "family_for"]
