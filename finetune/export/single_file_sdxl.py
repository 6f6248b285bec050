"""Save a Stable Diffusion XL model as one original-layout checkpoint: the layout of Stability's generative-models
("SGM") code and of the released `sd_xl_base_1.0.safetensors`, which AUTOMATIC1111, ComfyUI and diffusers'
`StableDiffusionXLPipeline.from_single_file` read.

SGM's DiffusionEngine keeps everything in one state dict under four prefixes:

* ``model.diffusion_model.*``: the U-Net, in the same openaimodel layout as SD 1.x (single_file.py explains it),
  plus ``label_emb.0.0`` / ``label_emb.0.2``: SDXL's size-and-pooled-text embedding (diffusers' ``add_embedding``),
  which SGM builds as ``Sequential(Sequential(Linear, SiLU, Linear))``. More transformer layers per block and
  linear ``proj_in``/``proj_out`` change no names: SpatialTransformer and diffusers' Transformer2DModel agree.
* ``first_stage_model.*``: the VAE, exactly as SD 1.x.
* ``conditioner.embedders.0.transformer.text_model.*``: CLIP ViT-L. SGM wraps a Hugging Face CLIPTextModel
  (FrozenCLIPEmbedder), so these are transformers' own names.
* ``conditioner.embedders.1.model.*``: OpenCLIP ViT-bigG (FrozenOpenCLIPEmbedder2 holds an open_clip model), in
  open_clip's names: ``token_embedding.weight``, ``positional_embedding`` (a bare parameter), per layer
  ``transformer.resblocks.N.{ln_1, attn.in_proj_weight/in_proj_bias, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}``
  (nn.MultiheadAttention stacks q, k and v in one matrix, in that order), ``ln_final`` and ``text_projection``,
  stored ``[width, projection]`` because open_clip computes ``x @ text_projection`` where transformers' Linear
  computes ``x @ weight.T``.

Loaders tell SDXL by these prefixes: A1111 by ``conditioner.embedders.1.model.ln_final.weight``, our
finetune.models.detect by ``conditioner.embedders.1.``, diffusers (``infer_diffusers_model_type``) by
``...embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias`` -- a CLIP-G of 10 layers or more, as released.

Not written, as in single_file.py: noise-schedule buffers, EMA copies, ``position_ids`` buffers; nor open_clip's
``logit_scale``, a contrastive-training scalar that text encoding never uses and that transformers does not keep
(released files carry it; loaders do without it). The SDXL refiner layout (OpenCLIP as ``embedders.0``, no
CLIP-L) is not this one and is refused.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from finetune.export.single_file import (
    ONE_LAYER, UNET_PREFIX, SingleFileExportError, _rename, unet_prefix_map, vae_to_original)
from finetune.io.safetensors_io import save_safetensors
from finetune.models.base import Components, unwrapped

CLIP_L_PREFIX = "conditioner.embedders.0.transformer.text_model."
CLIP_G_PREFIX = "conditioner.embedders.1.model."

# the transformers CLIP text model's parts (below `text_model.`) that SGM's CLIP-L keeps under its own names
CLIP_TEXT_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")
# transformers CLIP name (below `text_model.`) -> open_clip name, outside the layers
OPEN_CLIP_NAMES = {"embeddings.token_embedding.weight": "token_embedding.weight",
                   "embeddings.position_embedding.weight": "positional_embedding",
                   "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
# inside one layer (`encoder.layers.N.` -> `transformer.resblocks.N.`); q/k/v are fused separately
OPEN_CLIP_LAYER_NAMES = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                         "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
LAYER_KEY = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
FUSED = ("q_proj", "k_proj", "v_proj")  # nn.MultiheadAttention's in_proj order


def to_sgm_state_dict(parts: Components) -> dict[str, torch.Tensor]:
    """The SDXL model in `parts` as one SGM-layout state dict (renamed tensors are shared, fused ones new)."""
    missing = [name for name in ("unet", "vae", "text_encoder", "text_encoder_2") if name not in parts.modules]
    if missing:
        raise SingleFileExportError(
            f"SDXL single-file export needs unet, vae, text_encoder (CLIP-L) and text_encoder_2 (CLIP-G); "
            f"missing {', '.join(missing)} (an SDXL refiner has no CLIP-L and a different layout)")
    tensors: dict[str, torch.Tensor] = {}
    tensors.update(unet_to_sgm(parts.modules["unet"]))
    tensors.update(vae_to_original(unwrapped(parts.modules["vae"])))
    tensors.update(clip_l_to_sgm(parts.modules["text_encoder"]))
    tensors.update(clip_g_to_open_clip(parts.modules["text_encoder_2"]))
    return tensors


def save_single_file_sdxl(path: str | os.PathLike, parts: Components, metadata: dict[str, str] | None = None,
                          dtype: torch.dtype | None = None) -> Path:
    """Write `parts` (an SDXL base: unet, vae, text_encoder, text_encoder_2, possibly wrapped) as one SGM-layout
    `.safetensors` checkpoint, atomically, with `metadata` in its header; `dtype` (e.g. torch.float16, what shared
    checkpoints use) casts the floating tensors. The layout is the released sd_xl_base_1.0's (module docstring)."""
    tensors = to_sgm_state_dict(parts)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    return save_safetensors(tensors, path, metadata)


def unet_to_sgm(unet: Any) -> dict[str, torch.Tensor]:
    unet = unwrapped(unet)
    if unet.config.get("addition_embed_type") != "text_time":
        raise SingleFileExportError(
            f"U-Net addition_embed_type={unet.config.get('addition_embed_type')!r}: an SDXL U-Net conditions on "
            "sizes and the pooled text ('text_time'); is this an SD 1.x/2.x U-Net (finetune.export.single_file)?")
    prefixes = unet_prefix_map(unet.config)
    prefixes["add_embedding.linear_1"] = ("label_emb.0.0", ONE_LAYER)  # index 1 of SGM's Sequential is the SiLU
    prefixes["add_embedding.linear_2"] = ("label_emb.0.2", ONE_LAYER)
    return _rename(unet.state_dict(), prefixes, UNET_PREFIX, "U-Net", layout="SDXL", family="SDXL")


def clip_l_to_sgm(text_encoder: Any) -> dict[str, torch.Tensor]:
    """CLIP-L keeps transformers' names; only the `text_model.` level is normalised, since transformers >= 5.6
    dropped it from CLIPTextModel's state dict and older versions have it."""
    tensors, unmapped = {}, []
    for key, value in unwrapped(text_encoder).state_dict().items():
        name = key.removeprefix("text_model.")
        if name.startswith(CLIP_TEXT_PARTS):
            tensors[CLIP_L_PREFIX + name] = value
        else:  # e.g. a projection: SGM's CLIP-L has none, and a loader would drop it without a word
            unmapped.append(key)
    _refuse_unmapped(unmapped, "text_encoder (CLIP-L)")
    return tensors


def clip_g_to_open_clip(text_encoder: Any) -> dict[str, torch.Tensor]:
    """transformers' CLIPTextModelWithProjection -> open_clip's text tower names (module docstring)."""
    tensors: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # (layer, weight|bias) -> {q_proj: ..., ...}
    unmapped = []
    for key, value in unwrapped(text_encoder).state_dict().items():
        name = key.removeprefix("text_model.")
        if name == "text_projection.weight":
            tensors[CLIP_G_PREFIX + "text_projection"] = value.T
        elif name in OPEN_CLIP_NAMES:
            tensors[CLIP_G_PREFIX + OPEN_CLIP_NAMES[name]] = value
        elif name == "embeddings.position_ids":  # a constant buffer older transformers saved; open_clip has none
            continue
        elif (match := LAYER_KEY.fullmatch(name)) is None:
            unmapped.append(key)
        else:
            layer, module, leaf = match.groups()
            if module.startswith("self_attn.") and module.removeprefix("self_attn.") in FUSED:
                qkv.setdefault((layer, leaf), {})[module.removeprefix("self_attn.")] = value
            elif module in OPEN_CLIP_LAYER_NAMES:
                tensors[f"{CLIP_G_PREFIX}transformer.resblocks.{layer}.{OPEN_CLIP_LAYER_NAMES[module]}.{leaf}"] = value
            else:
                unmapped.append(key)
    _refuse_unmapped(unmapped, "text_encoder_2 (CLIP-G)")
    for (layer, leaf), pieces in qkv.items():
        if set(pieces) != set(FUSED):  # a partial attention cannot be fused into open_clip's one matrix
            raise SingleFileExportError(f"text_encoder_2 (CLIP-G) layer {layer}: {leaf} of {sorted(pieces)} only, "
                                        f"open_clip's in_proj needs all of {', '.join(FUSED)}")
        fused = torch.cat([pieces[name] for name in FUSED])
        tensors[f"{CLIP_G_PREFIX}transformer.resblocks.{layer}.attn.in_proj_{leaf}"] = fused
    if CLIP_G_PREFIX + "text_projection" not in tensors:
        raise SingleFileExportError(
            f"text_encoder_2 is a {type(unwrapped(text_encoder)).__name__} without text_projection: SDXL's pooled "
            "prompt embedding needs CLIP-G's projection (CLIPTextModelWithProjection)")
    return tensors


def _refuse_unmapped(unmapped: list[str], what: str) -> None:
    if unmapped:
        shown = ", ".join(unmapped[:5]) + (f" (and {len(unmapped) - 5} more)" if len(unmapped) > 5 else "")
        raise SingleFileExportError(f"{what}: {len(unmapped)} parameter(s) have no place in the SDXL original "
                                    f"layout, so the checkpoint would lose them: {shown}")
