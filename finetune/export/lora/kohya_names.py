"""How kohya's files name a model family's modules: the prefix per component and, for the denoiser, whose module
names are used.

- SD 1.x/2.x: `lora_unet_` + the diffusers module path (`down_blocks_0_attentions_0_...`), `lora_te_` + CLIP's.
- SDXL: kohya's SDXL U-Net is Stability's SGM code, so its files use the original (SGM/LDM) module names
  (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`), and the text encoders are `lora_te1_` (CLIP-L)
  and `lora_te2_` (CLIP-G, in transformers' names). AUTOMATIC1111 and ComfyUI map SGM names to their models
  directly; diffusers' loader maps them back (`_maybe_map_sgm_blocks_to_diffusers`).
- Flux.1: `lora_unet_` + Black Forest Labs' module names (`double_blocks_0_img_attn_qkv`), q/k/v fused as BFL's
  model fuses them, and `lora_te1_` (CLIP-L); kohya_flux.py.
- SD3/3.5: `lora_unet_` + Stability AI's MMDiT names (`joint_blocks_0_x_block_attn_qkv`), q/k/v fused, and
  `lora_te1_` / `lora_te2_` (CLIP-L, CLIP-G); kohya_sd3.py.
The SGM name of a diffusers module comes from the same prefix map the single-file checkpoint writer uses
(finetune/export/single_file.py), so the LoRA names and the checkpoint names cannot disagree.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from finetune.export.lora import kohya_flux, kohya_sd3
from finetune.export.lora.layers import LoraFileError
from finetune.export.single_file import SingleFileExportError, rename_key, unet_prefix_map

# component -> the prefix written (SD 1.x/2.x); prefix -> component, read (SDXL's first text encoder is te1)
PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
READ_PREFIXES = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder",
                 "lora_te2": "text_encoder_2"}
SGM_BLOCKS = ("input_blocks_", "middle_block_", "output_blocks_")
DENOISERS = ("unet", "transformer")


@dataclass(frozen=True)
class KohyaNaming:
    """A family's kohya names: `prefixes` per component, `denoiser_original` turning a denoiser module path
    into the path kohya names (None: the diffusers path as it is), `regroup` turning the denoiser's layers (module
    path -> layer) into kohya's modules where kohya's model fuses some (Flux's q/k/v; None: one to one), and the
    `ss_base_model_version` it writes (None: told from the layers' widths, kohya_metadata.py)."""

    prefixes: dict[str, str] = field(default_factory=lambda: dict(PREFIXES))
    denoiser_original: Optional[Callable[[str], str]] = None
    version: Optional[str] = None
    regroup: Optional[Callable[[dict], dict]] = None

    def denoiser_layers(self, component: str, layers: dict) -> dict:
        """A component's layers as kohya's modules hold them (the denoiser's regrouped, others as they are)."""
        return self.regroup(layers) if self.regroup is not None and component in DENOISERS else layers

    def module_name(self, component: str, module: str) -> str:
        """The module part of a kohya key (dots as in the path; the caller underscores it)."""
        if component == "unet" and self.denoiser_original is not None:
            return self.denoiser_original(module)
        return module


SD_NAMING = KohyaNaming()


# the denoiser layouts a family's `kohya_unet_layout` names: the diffusers module paths, Stability's SGM/LDM
# U-Net names, Black Forest Labs' Flux names (q/k/v fused, kohya_flux.py), Stability AI's MMDiT names (q/k/v
# fused, kohya_sd3.py), or none written
LAYOUTS = ("diffusers", "sgm", "bfl", "mmdit", "none")
FUSED_LAYOUTS = {"bfl": "Flux", "mmdit": "SD3"}  # layouts whose fused modules hold no LoHa / LoKr


def naming_for(family: Any, unet_config: Any) -> KohyaNaming:
    """A family's naming (its spec's `kohya_prefixes`, `kohya_unet_layout`: one of LAYOUTS, and
    `kohya_base_model_version`) for a U-Net of `unet_config` (layers_per_block, block types)."""
    prefixes, version = dict(family.kohya_prefixes), family.kohya_base_model_version
    if family.kohya_unet_layout == "diffusers":
        return KohyaNaming(prefixes, version=version)
    if family.kohya_unet_layout == "bfl":
        return KohyaNaming(prefixes, version=version, regroup=kohya_flux.to_bfl)
    if family.kohya_unet_layout == "mmdit":
        return KohyaNaming(prefixes, version=version, regroup=kohya_sd3.to_sai)
    if family.kohya_unet_layout == "none":  # no kohya layout written for this family's denoiser
        return KohyaNaming({name: prefix for name, prefix in prefixes.items() if name.startswith("text_encoder")},
                           version=version)
    return KohyaNaming(prefixes, _to_sgm(dict(unet_config)), version)


def naming_of(weights: Any) -> KohyaNaming:
    """The naming for LoRA layers alone (`finetune convert` and `resize` without the base): the family the header
    names (its recipe's model.family, or its ss_base_model_version), a Flux-layout transformer's when the layers
    are one; else SDXL's when the layers say SDXL (a second text encoder, a 2048-wide context), with the U-Net's
    layout read from the layers' own names (the released SDXL's when they do not tell); SD's otherwise."""
    from finetune.models import specs

    told = family_in_header(weights.metadata)
    if told is None and "transformer" in weights.layers and kohya_flux.is_flux_diffusers(
            list(weights.layers["transformer"])):
        told = next((spec for spec in specs().values() if spec.kohya_unet_layout == "bfl"), None)
    if told is not None and "transformer" in weights.layers:
        return naming_for(told, None)
    widths = {int(layer.down.shape[1]) for component, module, layer in weights.modules()
              if component == "unet" and module.endswith("attn2.to_k")}
    sgm = next(spec for spec in specs().values() if spec.kohya_unet_layout == "sgm")
    if not ("text_encoder_2" in weights.layers or 2048 in widths or told is sgm):
        return SD_NAMING
    names = list(weights.layers.get("unet", {}))
    released = dict(sgm.released_unet_config)
    layout = _layout_from_names(names, released["layers_per_block"]) or released
    return naming_for(sgm, layout)


def family_in_header(metadata: dict[str, str]) -> Any | None:
    """The registered family a header names: its recipe's model.family (not auto), or a family's
    ss_base_model_version (kohya's SDXL versions all start sdxl)."""
    import json

    from finetune.models import specs

    try:
        named = json.loads(metadata.get("finetune.recipe") or "{}").get("model", {}).get("family")
    except (ValueError, AttributeError):
        named = None
    version = metadata.get("ss_base_model_version", "")
    return next((spec for spec in specs().values() if spec.name == named or (
        spec.kohya_base_model_version and (version == spec.kohya_base_model_version or (
            version.startswith("sdxl_") and spec.kohya_base_model_version.startswith("sdxl_"))))), None)


def _to_sgm(unet_config: dict) -> Callable[[str], str]:
    prefixes = unet_prefix_map(unet_config)

    def original(module: str) -> str:
        renamed = rename_key(f"{module}.weight", prefixes)
        if renamed is None:
            raise LoraFileError(f"unet.{module} has no place in the SGM layout kohya's SDXL files use")
        return renamed.removesuffix(".weight")
    return original


def sgm_aliases(names: list[str]) -> dict[str, str]:
    """{underscored SGM name: diffusers path} for a U-Net's module paths `names`, its layout read from the names
    themselves (layers per block, which blocks attend); empty when they do not form an SGM-mappable U-Net."""
    config = _layout_from_names(names)
    if config is None:
        return {}
    try:
        original = _to_sgm(config)
        return {original(name).replace(".", "_"): name for name in names if _mappable(original, name)}
    except SingleFileExportError:
        return {}


def _mappable(original: Callable[[str], str], name: str) -> bool:
    try:
        original(name)
        return True
    except LoraFileError:
        return False


def _layout_from_names(names: list[str], default_layers: int | None = None) -> dict | None:
    """A U-Net config with what SGM names depend on (layers per block, which blocks attend), read from module
    paths: the resnets' count, or else the attentions' (every layer of an attending block has one), or else
    `default_layers`; None when the names tell nothing."""
    def found(pattern: str) -> list[tuple[int, ...]]:
        return [tuple(map(int, m.groups())) for m in map(re.compile(pattern).match, names) if m]

    per_block = found(r"down_blocks\.(\d+)\.resnets\.(\d+)\.") or found(r"down_blocks\.(\d+)\.attentions\.(\d+)\.")
    layers = max(layer for _, layer in per_block) + 1 if per_block else default_layers
    blocks = [b for (b,) in found(r"(?:down|up)_blocks\.(\d+)\.")]
    if layers is None or not blocks:
        return None
    count = max(max(blocks) + 1, 2)
    attends = {part: {b for (b,) in found(rf"{part}\.(\d+)\.attentions\.")} for part in ("down_blocks", "up_blocks")}
    return {"layers_per_block": layers,
            "down_block_types": ["CrossAttnDownBlock2D" if b in attends["down_blocks"] else "DownBlock2D"
                                 for b in range(count)],
            "up_block_types": ["CrossAttnUpBlock2D" if b in attends["up_blocks"] else "UpBlock2D"
                               for b in range(count)],
            "mid_block_type": "UNetMidBlock2DCrossAttn"}


@functools.lru_cache(maxsize=1)
def sdxl_reference_aliases() -> dict[str, str]:
    """SGM aliases of the released SDXL U-Net's Linear and Conv2d modules, from diffusers' class built on the meta
    device (no memory): how a kohya SDXL file's U-Net names are read without the base model at hand."""
    import torch
    from diffusers import UNet2DConditionModel

    from finetune.models import specs

    released = next(spec.released_unet_config for spec in specs().values() if spec.kohya_unet_layout == "sgm")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**released)
    names = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    return sgm_aliases(names)
