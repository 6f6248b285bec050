"""kohya's SD3/SD3.5 LoRA layout: the MMDiT's modules under Stability AI's own names (`lora_unet_joint_blocks_0_
x_block_attn_qkv`), q/k/v fused, as kohya-ss sd-scripts (networks/lora_sd3.py) writes them. It is the SD3 layout
both ComfyUI and Forge apply:
- ComfyUI (comfy/lora.py `model_lora_keys_unet`) maps `lora_unet_` + every `diffusion_model.` weight name of the
  loaded model, underscored, for any model, beside its SD3-only `transformer.` map of diffusers' names;
- Forge (packages_3rdparty/comfyui_lora_collection/lora.py `model_lora_keys_unet`) has the same generic map, and
  its SD3 `transformer.` map commented out: a diffusers-layout SD3 file changes nothing there.
Both read `<key>.alpha` and scale by alpha / rank (1 without it), so the kohya writer's 0-d alphas are exact.

The names are those of diffusers' own converter (`convert_sd3_transformer_checkpoint_to_diffusers` in
diffusers/loaders/single_file_utils.py), read backwards. Fusing and splitting are kohya_flux.py's (exact, block-
diagonal). Modules whose original weight diffusers reorders (the last block's `norm1_context` and `norm_out`,
(shift, scale) swapped) or has no Linear for are refused by name.
"""
from __future__ import annotations

import re

from finetune.export.lora.kohya_flux import fuse, split
from finetune.export.lora.layers import LoraFileError, LoraLayer

# diffusers module (inside transformer_blocks.N.) -> SAI module (inside joint_blocks.N.)
JOINT = {"attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
         "attn2.to_out.0": "x_block.attn2.proj", "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
         "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2",
         "norm1.linear": "x_block.adaLN_modulation.1"}
# SAI's fused projections -> their diffusers members, in the order their outputs are stacked
JOINT_FUSED = {"x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
               "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
               "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v")}
TOP = {"context_embedder": "context_embedder",
       "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
       "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
       "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
       "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
       "proj_out": "final_layer.linear"}

_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.(.+)")
_SAI_BLOCK = re.compile(r"joint_blocks_(\d+)_(.+)")


def is_sd3_kohya(underscored: list[str]) -> bool:
    """Whether a kohya file's U-Net names (without `lora_unet_`) are SD3's joint blocks."""
    return any(_SAI_BLOCK.match(name) for name in underscored)


def to_sai(layers: dict[str, LoraLayer]) -> dict[str, LoraLayer]:
    """An SD3 transformer's LoRA layers (diffusers module path -> layer) as kohya's: SAI module path -> layer, q/k/v
    fused. LoraFileError names a module the layout has no place for."""
    out: dict[str, LoraLayer] = {}
    fused: dict[tuple[str, str], dict[str, LoraLayer]] = {}
    for module, layer in layers.items():
        found = _BLOCK.fullmatch(module)
        if found:
            index, rest = found.groups()
            if rest in JOINT:
                out[f"joint_blocks.{index}.{JOINT[rest]}"] = layer
                continue
            group = next((name for name, members in JOINT_FUSED.items() if rest in members), None)
            if group is not None:
                fused.setdefault((index, group), {})[rest] = layer
                continue
        elif module in TOP:
            out[TOP[module]] = layer
            continue
        raise LoraFileError(f"transformer.{module} has no place in kohya's SD3 layout (Stability AI's module "
                            "names); keep this LoRA in the diffusers format")
    for (index, group), present in fused.items():
        inner = next(iter(present.values())).up.shape[0]  # q, k and v are each the inner width
        out[f"joint_blocks.{index}.{group}"] = fuse([(present.get(m), inner) for m in JOINT_FUSED[group]])
    return out


def _underscored(table: dict[str, str]) -> dict[str, str]:
    return {sai.replace(".", "_"): diffusers for diffusers, sai in table.items()}


def from_sai(layers: dict[str, LoraLayer], source: str) -> dict[str, LoraLayer]:
    """A kohya SD3 file's transformer layers (underscored SAI name without `lora_unet_` -> layer) as diffusers
    module path -> layer, fused q/k/v split (kohya_flux.split). LoraFileError names a module it cannot place."""
    joint, top = _underscored(JOINT), _underscored(TOP)
    fused = {sai.replace(".", "_"): members for sai, members in JOINT_FUSED.items()}
    out = {}
    for underscored, layer in layers.items():
        found = _SAI_BLOCK.fullmatch(underscored)
        if found:
            index, tail = found.groups()
            if tail in joint:
                out[f"transformer_blocks.{index}.{joint[tail]}"] = layer
                continue
            if tail in fused:
                third = layer.up.shape[0] // 3
                for name, part in split(layer, [third] * 3, fused[tail]).items():
                    out[f"transformer_blocks.{index}.{name}"] = part
                continue
        elif underscored in top:
            out[top[underscored]] = layer
            continue
        raise LoraFileError(f"{source}: lora_unet_{underscored} is no SD3 module this toolkit reads in kohya's "
                            "layout")
    return out
