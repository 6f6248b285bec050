"""Save a Stable Diffusion 1.x model as one original-layout ("CompVis/LDM") checkpoint, the kind A1111 and ComfyUI load.

The original training code (CompVis latent-diffusion) kept the whole model in one state dict under three prefixes:

* ``model.diffusion_model.*``: the U-Net, as a flat list of ``input_blocks`` (conv_in, then per resolution
  ``layers_per_block`` entries of resnet ``.0`` + optional attention ``.1``, then a downsampler entry ``.0.op``),
  a ``middle_block`` (resnet, attention, resnet) and ``output_blocks`` (per resolution ``layers_per_block + 1``
  entries of resnet, attention, and on the last entry an upsampler ``.conv``). Resnets use the Sequential names
  ``in_layers.0/2``, ``emb_layers.1``, ``out_layers.0/3``, ``skip_connection``; the attention (SpatialTransformer)
  names are the ones diffusers kept.
* ``first_stage_model.*``: the VAE, with ``encoder.down.N.block.M`` / ``decoder.up.N.block.M`` (the decoder's ``up``
  list is numbered from the lowest resolution, so it runs opposite to diffusers' ``up_blocks``), ``mid.block_1``,
  ``mid.attn_1``, ``mid.block_2``. Its mid-block attention is made of 1x1 convolutions ``q k v proj_out``, so the
  diffusers Linear weights are stored reshaped to ``[out, in, 1, 1]``.
* ``cond_stage_model.transformer.*``: the Hugging Face CLIPTextModel state dict, under ``text_model.``.

The mapping is built from the models' configs (number of blocks, ``layers_per_block``, which blocks attend), and every
diffusers parameter must be covered by it: an unmapped one (SDXL's ``add_embedding``, a class embedding, LCM's
``cond_proj``) means the checkpoint would silently lose weights, so it is an error instead.

Not written: the noise-schedule buffers (``betas``, ``alphas_cumprod``...; loaders rebuild them from their config),
EMA copies (``model_ema.*``), and the text encoder's ``position_ids`` buffer. Nothing in the weights says
"v-prediction", so an SD2-768-style U-Net would need its yaml beside it; SD2's OpenCLIP text encoder is refused.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from finetune.io.safetensors_io import save_safetensors

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer.text_model."

# leaf renames inside one resnet; the original ResBlock is built from nn.Sequentials, hence the numeric names
UNET_RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                     "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET_NAMES = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                    "conv_shortcut": "nin_shortcut"}
VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
ONE_LAYER = {"weight": "weight", "bias": "bias"}
# a SpatialTransformer's parameter names are the ones diffusers' Transformer2DModel kept
SAME_NAMES = None

# diffusers module prefix -> (original prefix, leaf renames); a parameter whose leaf is not listed has no place
PrefixMap = dict[str, tuple[str, "dict[str, str] | None"]]


class SingleFileExportError(ValueError):
    """The model cannot be written as an SD1 original-layout checkpoint without losing or misplacing weights."""


def to_original_state_dict(unet: Any, vae: Any, text_encoder: Any) -> dict[str, torch.Tensor]:
    """The three diffusers/transformers models as one original-layout state dict (tensors shared, not copied)."""
    tensors: dict[str, torch.Tensor] = {}
    tensors.update(unet_to_original(unet))
    tensors.update(vae_to_original(vae))
    tensors.update(text_encoder_to_original(text_encoder))
    return tensors


def save_single_file(path: str | os.PathLike, unet: Any, vae: Any, text_encoder: Any,
                     metadata: dict[str, str] | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write the checkpoint atomically; `dtype` (e.g. torch.float16, what most shared checkpoints use) casts floats."""
    tensors = to_original_state_dict(unet, vae, text_encoder)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    return save_safetensors(tensors, path, metadata)


def unet_to_original(unet: Any) -> dict[str, torch.Tensor]:
    unet = _unwrapped(unet)
    return _rename(unet.state_dict(), unet_prefix_map(unet.config), UNET_PREFIX, "U-Net")


def vae_to_original(vae: Any) -> dict[str, torch.Tensor]:
    vae = _unwrapped(vae)
    renamed = _rename(vae.state_dict(), vae_prefix_map(vae.config), VAE_PREFIX, "VAE")
    # the original attention is 1x1 convolutions, diffusers' is Linear layers with the same numbers
    return {k: v[:, :, None, None] if ".mid.attn_1." in k and v.ndim == 2 else v for k, v in renamed.items()}


def text_encoder_to_original(text_encoder: Any) -> dict[str, torch.Tensor]:
    text_encoder = _unwrapped(text_encoder)
    refuse_non_sd1_text_encoder(text_encoder)
    tensors = {}
    for key, value in text_encoder.state_dict().items():
        # transformers >= 5.6 flattened CLIPTextModel (no `text_model.` level); older versions still have it
        tensors[TEXT_ENCODER_PREFIX + key.removeprefix("text_model.")] = value
    return tensors


def refuse_non_sd1_text_encoder(text_encoder: Any) -> None:
    """SD1 conditions on OpenAI CLIP ViT-L/14 (quick_gelu); SD2's OpenCLIP is also a CLIPTextModel in diffusers,
    but its original layout (`cond_stage_model.model.*`, fused in_proj, a 24th layer diffusers dropped) differs."""
    name = type(text_encoder).__name__
    hidden_act = getattr(getattr(text_encoder, "config", None), "hidden_act", None)
    if name != "CLIPTextModel" or hidden_act != "quick_gelu":
        raise SingleFileExportError(
            f"single-file export supports only SD1-style CLIP text encoders (CLIPTextModel with quick_gelu) for now; "
            f"got {name} with hidden_act={hidden_act!r}. SD2's OpenCLIP encoder (cond_stage_model.model.* layout) "
            "is not supported yet: save the diffusers folder instead")


def unet_prefix_map(config: Any) -> PrefixMap:
    """diffusers module prefix -> (original prefix, leaf renames), for this U-Net's shape."""
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise SingleFileExportError(f"U-Net layers_per_block={layers!r}: the original layout (and the loaders that "
                                    "read it) assume one count for every resolution")
    if config["mid_block_type"] != "UNetMidBlock2DCrossAttn":
        raise SingleFileExportError(f"U-Net mid_block_type={config['mid_block_type']!r}: the SD1 original layout "
                                    "has a resnet, cross-attention, resnet middle block")
    down_types, up_types = config["down_block_types"], config["up_block_types"]
    prefixes: PrefixMap = {
        "time_embedding.linear_1": ("time_embed.0", ONE_LAYER), "time_embedding.linear_2": ("time_embed.2", ONE_LAYER),
        "conv_in": ("input_blocks.0.0", ONE_LAYER), "conv_norm_out": ("out.0", ONE_LAYER),
        "conv_out": ("out.2", ONE_LAYER),
        "mid_block.resnets.0": ("middle_block.0", UNET_RESNET_NAMES),
        "mid_block.attentions.0": ("middle_block.1", SAME_NAMES),
        "mid_block.resnets.1": ("middle_block.2", UNET_RESNET_NAMES),
    }
    entry = 1  # input_blocks.0 is conv_in
    for block, block_type in enumerate(down_types):
        for layer in range(layers):
            prefixes[f"down_blocks.{block}.resnets.{layer}"] = (f"input_blocks.{entry}.0", UNET_RESNET_NAMES)
            if "CrossAttn" in block_type:
                prefixes[f"down_blocks.{block}.attentions.{layer}"] = (f"input_blocks.{entry}.1", SAME_NAMES)
            entry += 1
        if block < len(down_types) - 1:  # the lowest resolution has no downsampler
            prefixes[f"down_blocks.{block}.downsamplers.0.conv"] = (f"input_blocks.{entry}.0.op", ONE_LAYER)
            entry += 1
    entry = 0
    for block, block_type in enumerate(up_types):
        attends = "CrossAttn" in block_type
        for layer in range(layers + 1):  # up blocks take one more resnet, for the skip from the downsampler
            prefixes[f"up_blocks.{block}.resnets.{layer}"] = (f"output_blocks.{entry}.0", UNET_RESNET_NAMES)
            if attends:
                prefixes[f"up_blocks.{block}.attentions.{layer}"] = (f"output_blocks.{entry}.1", SAME_NAMES)
            entry += 1
        if block < len(up_types) - 1:  # the upsampler sits in the block's last entry, after its attention if any
            upsampler = f"output_blocks.{entry - 1}.{2 if attends else 1}.conv"
            prefixes[f"up_blocks.{block}.upsamplers.0.conv"] = (upsampler, ONE_LAYER)
    return prefixes


def vae_prefix_map(config: Any) -> PrefixMap:
    layers, blocks = config["layers_per_block"], len(config["block_out_channels"])
    prefixes: PrefixMap = {"quant_conv": ("quant_conv", ONE_LAYER), "post_quant_conv": ("post_quant_conv", ONE_LAYER)}
    for part in ("encoder", "decoder"):
        prefixes[f"{part}.conv_in"] = (f"{part}.conv_in", ONE_LAYER)
        prefixes[f"{part}.conv_norm_out"] = (f"{part}.norm_out", ONE_LAYER)
        prefixes[f"{part}.conv_out"] = (f"{part}.conv_out", ONE_LAYER)
        prefixes[f"{part}.mid_block.resnets.0"] = (f"{part}.mid.block_1", VAE_RESNET_NAMES)
        prefixes[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", VAE_ATTENTION_NAMES)
        prefixes[f"{part}.mid_block.resnets.1"] = (f"{part}.mid.block_2", VAE_RESNET_NAMES)
    for block in range(blocks):
        for layer in range(layers):
            prefixes[f"encoder.down_blocks.{block}.resnets.{layer}"] = (f"encoder.down.{block}.block.{layer}",
                                                                        VAE_RESNET_NAMES)
        prefixes[f"encoder.down_blocks.{block}.downsamplers.0.conv"] = (f"encoder.down.{block}.downsample.conv",
                                                                       ONE_LAYER)
        level = blocks - 1 - block  # the original decoder counts levels from the lowest resolution up
        for layer in range(layers + 1):
            prefixes[f"decoder.up_blocks.{block}.resnets.{layer}"] = (f"decoder.up.{level}.block.{layer}",
                                                                      VAE_RESNET_NAMES)
        prefixes[f"decoder.up_blocks.{block}.upsamplers.0.conv"] = (f"decoder.up.{level}.upsample.conv", ONE_LAYER)
    return prefixes


def _rename(state_dict: dict[str, torch.Tensor], prefixes: PrefixMap, target_prefix: str,
            what: str, layout: str = "SD1", family: str = "SD1/SD2") -> dict[str, torch.Tensor]:
    """`state_dict` under `target_prefix` with every key renamed by `prefixes`; an error names any key it cannot
    place (`layout` and `family` only word that error: single_file_sdxl.py reuses this for SDXL)."""
    renamed: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, value in state_dict.items():
        new_key = rename_key(key, prefixes)
        if new_key is None:
            unmapped.append(key)
            continue
        if target_prefix + new_key in renamed:
            raise SingleFileExportError(f"{what}: two parameters map to {target_prefix + new_key}")
        renamed[target_prefix + new_key] = value
    if unmapped:
        shown = ", ".join(unmapped[:5]) + (f" (and {len(unmapped) - 5} more)" if len(unmapped) > 5 else "")
        raise SingleFileExportError(
            f"{what}: {len(unmapped)} parameter(s) have no place in the {layout} original layout, so the checkpoint "
            f"would lose them: {shown}. Is this an {family} {what}?")
    return renamed


def rename_key(key: str, prefixes: PrefixMap) -> str | None:
    """A diffusers key (or module path + ".weight") in the original layout by `prefixes`; None: it has no place."""
    # walk from the longest candidate prefix so `...resnets.1` never matches inside `...resnets.10`
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        found = prefixes.get(".".join(parts[:cut]))
        if found is None:
            continue
        original_prefix, leaf_names = found
        rest = ".".join(parts[cut:])
        if leaf_names is SAME_NAMES:
            return f"{original_prefix}.{rest}"
        for old, new in leaf_names.items():
            if rest == old or rest.startswith(old + "."):
                return f"{original_prefix}.{new}{rest[len(old):]}"
        return None
    return None


def _unwrapped(module: Any) -> Any:
    # DDP / accelerate wrappers keep the real model in `.module`; peft-wrapped models must be merged first
    return getattr(module, "module", module)
