"""Learned embeddings in the three files people load them from.

- diffusers: `learned_embeds.safetensors` = {token: tensor[num_vectors, dim]}, read by
  `pipe.load_textual_inversion` (which expands a multi-vector token to `<tok>`, `<tok>_1`, ...).
  A family with two CLIP encoders (SDXL, SD3) gets {"clip_l": ..., "clip_g": ...} per token instead; Flux's
  one CLIP-L gets the plain layout, which FluxPipeline.load_textual_inversion reads.
- AUTOMATIC1111 / kohya `.safetensors`: {"emb_params": tensor[num_vectors, dim]} (SDXL: {"clip_l": ...,
  "clip_g": ...}, kohya's sdxl_train_textual_inversion.py layout); the file name is the word typed in prompts.
  One file per placeholder, in `a1111/`.
- AUTOMATIC1111 `.pt` (on request): a pickle {"string_to_token": {"*": 265}, "string_to_param": {"*": tensor},
  "name", "step", "sd_checkpoint", "sd_checkpoint_name"}; plain containers only, so it loads with
  `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from finetune.io.pickle_files import load_plain_pickle, write_pickle_atomically
from finetune.io.safetensors_io import save_safetensors

FILE_NAME = "learned_embeds.safetensors"
A1111_DIR = "a1111"
A1111_KEY = "emb_params"
_UNSAFE = re.compile(r'[<>:"/\\|?*\s]+')


def a1111_name(token: str) -> str:
    """The file stem (and so the prompt word in AUTOMATIC1111) for a placeholder: no characters a file
    system refuses, e.g. "<sks>" -> "sks"."""
    return _UNSAFE.sub("", token) or "embedding"


def diffusers_tensors(learned: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    encoders = {name for per in learned.values() for name in per}
    if len(encoders) == 1:
        return {token: next(iter(per.values())) for token, per in learned.items()}
    if len(learned) != 1:
        raise ValueError("with two text encoders, one placeholder per file (the format has no room for more)")
    return dict(next(iter(learned.values())))


def save_all(output_dir: Path, learned: dict[str, dict[str, torch.Tensor]], metadata: dict[str, str],
             pt: bool = False) -> Path:
    """Write every format; return the diffusers file's path."""
    path = save_safetensors(diffusers_tensors(learned), output_dir / FILE_NAME, metadata)
    for token, per in learned.items():
        stem = output_dir / A1111_DIR / a1111_name(token)
        if len(per) != 1:  # SDXL: the same {"clip_l", "clip_g"} file, named for the prompt word
            save_safetensors(dict(per), stem.with_suffix(".safetensors"), metadata)
            continue
        vectors = next(iter(per.values()))
        save_safetensors({A1111_KEY: vectors}, stem.with_suffix(".safetensors"), metadata)
        if pt:
            save_a1111_pt(vectors, stem.with_suffix(".pt"), token, int(metadata.get("finetune.steps", 0)),
                          metadata.get("finetune.base_model", ""))
    return path


def save_a1111_pt(vectors: torch.Tensor, path: Path, token: str, step: int, base_model: str) -> Path:
    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors.detach().cpu().clone()},
            "name": a1111_name(token), "step": step, "sd_checkpoint": None, "sd_checkpoint_name": base_model}
    return write_pickle_atomically(data, path)


def read_a1111_pt(path: str | os.PathLike) -> tuple[str, torch.Tensor]:
    """(name, vectors) from an AUTOMATIC1111 .pt, refusing pickles that need more than plain data."""
    return embedding_from_a1111(load_plain_pickle(path, "AUTOMATIC1111 embedding"), path)


def embedding_from_a1111(data: object, path: object) -> tuple[str, torch.Tensor]:
    if not isinstance(data, dict) or "string_to_param" not in data:
        raise ValueError(f"{path}: not an AUTOMATIC1111 embedding (no string_to_param)")
    return str(data.get("name") or Path(path).stem), data["string_to_param"]["*"]
