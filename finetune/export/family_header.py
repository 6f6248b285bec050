"""The header keys other programs read to tell which model family a file is for, written into every artifact.

What each reads (the facts this relies on):
- AUTOMATIC1111 (extensions-builtin/Lora/network.py, `NetworkOnDisk.detect_version`): SDXL when
  `ss_base_model_version` starts with `sdxl_`, else SD2 when `ss_v2` is "True", else SD1 for any file with a
  header (Unknown without one). Its Lora page hides networks of another version than the loaded model's.
- Forge (extensions-builtin/sd_forge_lora/network.py, `detect_version`): Flux when `modelspec.implementation` is
  Black Forest Labs' repository or `modelspec.architecture` is `flux-1-dev/lora`; SDXL when the architecture is
  `stable-diffusion-xl-v1-base/lora` or `ss_base_model_version` starts with `sdxl_`; then A1111's rules.
- kohya-ss sd-scripts writes these values (library/sai_model_spec.py `determine_architecture`, the trainers'
  `ss_base_model_version`): sd_v1, sd_v2 (sd_v2_768_v for v-prediction), sdxl_base_v1-0, sd3, flux1; the
  architecture is the base's id plus `/lora` or `/textual-inversion` for adapters.
ComfyUI tells the family from the loaded model, not the file, so these keys are what the two web UIs need.
"""
from __future__ import annotations

from typing import Optional

# cross-attention width (what the text encoder hands the U-Net) -> kohya's name for an SD 1.x/2.x/XL base
VERSIONS_BY_WIDTH = {768: "sd_v1", 1024: "sd_v2", 2048: "sdxl_base_v1-0"}
# kohya's SD 1.x/2.x/XL versions -> ModelSpec's ids; the other families declare theirs (their FamilySpec's
# modelspec_architecture and modelspec_implementation, looked up by their kohya_base_model_version)
ARCHITECTURES = {"sd_v1": "stable-diffusion-v1", "sd_v2": "stable-diffusion-v2-512",
                 "sd_v2_768_v": "stable-diffusion-v2-768-v", "sdxl_base_v1-0": "stable-diffusion-xl-v1-base"}
DIFFUSERS = "https://github.com/huggingface/diffusers"
# an artifact's strategy -> the adapter suffix of modelspec.architecture (None: a whole model, no suffix)
ADAPTER_SUFFIXES = {"lora": "lora", "textual_inversion": "textual-inversion", "hypernetwork": "hypernetwork"}


def version_from_width(width: Optional[int], prediction_type: Optional[str]) -> str:
    """kohya's ss_base_model_version of an SD 1.x/2.x/XL base from its cross-attention width (a width the table
    lacks, such as a tiny test model's, counts as SD1's layout) and prediction type."""
    version = VERSIONS_BY_WIDTH.get(width or 768, "sd_v1")
    return "sd_v2_768_v" if version == "sd_v2" and prediction_type == "v_prediction" else version


def architecture(version: str, adapter: Optional[str], base_name: str = "") -> str:
    """modelspec.architecture: the base's id (`flux-1-schnell` when the base's name says schnell: a file has
    nothing else to tell dev from schnell by) plus `/<adapter>`."""
    spec = _spec_of_version(version)
    arch = ARCHITECTURES.get(version) or (spec and spec.modelspec_architecture) or version
    if version == "flux1" and "schnell" in str(base_name).lower():
        arch = "flux-1-schnell"
    return f"{arch}/{adapter}" if adapter else arch


def family_fields(version: str, strategy: Optional[str], base_name: str = "") -> dict[str, str]:
    """The header keys AUTOMATIC1111, Forge and the model-spec readers tell the family by, for an artifact of
    `strategy` (lora, textual_inversion, hypernetwork, dreambooth) on a base of kohya's `version`."""
    return {"ss_base_model_version": version, "ss_v2": str(version.startswith("sd_v2")),
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": architecture(version, ADAPTER_SUFFIXES.get(strategy or ""), base_name),
            "modelspec.implementation": getattr(_spec_of_version(version), "modelspec_implementation", None)
            or DIFFUSERS}


def _spec_of_version(version: str):
    """The registered family whose kohya_base_model_version is `version`, or None."""
    from finetune.models import specs

    return next((spec for spec in specs().values() if spec.kohya_base_model_version == version), None)


def family_version(family, parts) -> str:
    """kohya's ss_base_model_version of a loaded base: the family's own (`kohya_base_model_version`), or for
    SD 1.x/2.x the denoiser's cross-attention width and the noise scheduler's prediction type."""
    from finetune.models.base import unwrapped

    if getattr(family, "kohya_base_model_version", None):
        return family.kohya_base_model_version
    config = unwrapped(parts.denoiser).config
    prediction = getattr(getattr(parts.noise_scheduler, "config", None), "prediction_type", None)
    return version_from_width(getattr(config, "cross_attention_dim", None), prediction)
