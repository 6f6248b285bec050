"""Which families finetune writes one original-layout checkpoint for (what AUTOMATIC1111 and ComfyUI load), and
writing one for a family (`finetune merge --out model.safetensors`).

The writers are export code, so they sit here, looked up by the layout the family's spec names
(`spec.single_file_layout`): a family's file says how it loads, trains and samples, and models/ imports nothing
from export/.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from finetune.models.base import Components

# (parts, path, metadata, dtype) -> the path written
Writer = Callable[[Components, str, Optional[dict[str, str]], Optional[torch.dtype]], Any]


def _write_sd(parts: Components, path: str, metadata: dict[str, str] | None, dtype: torch.dtype | None) -> Any:
    from finetune.export.single_file import save_single_file

    return save_single_file(path, parts.unet, parts.vae, parts.text_encoder, metadata=metadata, dtype=dtype)


def _write_sdxl(parts: Components, path: str, metadata: dict[str, str] | None, dtype: torch.dtype | None) -> Any:
    from finetune.export.single_file_sdxl import save_single_file_sdxl

    return save_single_file_sdxl(path, parts, metadata=metadata, dtype=dtype)


# spec.single_file_layout -> its writer: CompVis's ldm layout (SD 1.x/2.x), Stability's sgm layout (SDXL)
WRITERS: dict[str, Writer] = {"ldm": _write_sd, "sgm": _write_sdxl}


def write_single_file(family: Any, parts: Components, path: str, metadata: dict[str, str] | None = None,
                      dtype: torch.dtype | None = None) -> Any:
    """One original-layout checkpoint of `family`'s `parts` at `path`, written atomically; a ValueError saying to
    write a folder instead for a family that has no writer yet."""
    writer = WRITERS.get(family.spec.single_file_layout or "")
    if writer is None:
        raise ValueError(f"finetune writes no single-file {family.spec.title} checkpoint yet; give --out a folder "
                         "(a diffusers pipeline folder, which diffusers and ComfyUI load)")
    return writer(parts, path, metadata, dtype)
