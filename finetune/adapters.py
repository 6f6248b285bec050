"""Apply a trained artifact to a diffusers pipeline. Which format a file is, and how each format loads, is the
format registry's (finetune/export/formats.py)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from finetune.export import formats
from finetune.export.adapter_files import load_a1111_pt
from finetune.export.mismatch import another_base_error
from finetune.io.pickle_files import load_plain_pickle
from finetune.io.safetensors_io import read_metadata
from finetune.models.base import adaptable_modules, denoiser_of
from finetune.networks import hypernetwork as hypernetworks
from finetune.networks import peft_layers


def detect_format(path: str | os.PathLike) -> str:
    """The registered format of a .safetensors adapter file."""
    return _adapter_format(path).name


def _adapter_format(path: str | os.PathLike) -> formats.FileFormat:
    path = str(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"{path}: expected a .safetensors adapter file (or an AUTOMATIC1111 .pt embedding or "
                         "hypernetwork)")
    # only the formats that load into a pipeline: a single-file checkpoint is a file finetune knows, no adapter
    return formats.detect(path, loadable=True)


def check_adapter_file(path: str | os.PathLike) -> None:
    """Before any model loads: raise FileProblem when the adapter file is missing, cut short or damaged, and
    ValueError when it is of no format that loads into a pipeline. Reads a .safetensors header only (safetensors
    checks it against the file's size); an AUTOMATIC1111 .pt (small) is read whole."""
    if str(path).endswith(".pt"):
        load_plain_pickle(path, "adapter file")
    else:
        _adapter_format(path)


def trained_recipe(path: str | os.PathLike) -> dict:
    """The recipe an artifact was trained with, from its header's finetune.recipe (a DreamBooth pipeline
    folder's finetune.json); {} for a file that does not say (another tool's, an A1111 .pt)."""
    import json

    folder = Path(path)
    try:
        if (folder / "model_index.json").is_file():  # a DreamBooth pipeline folder
            metadata = json.loads((folder / "finetune.json").read_text())
        elif str(path).endswith(".safetensors"):
            metadata = read_metadata(path)
        else:
            return {}
        recipe = json.loads(metadata["finetune.recipe"])
    except (OSError, KeyError, TypeError, ValueError):
        return {}
    return recipe if isinstance(recipe, dict) else {}


def trained_max_token_length(path: str | os.PathLike) -> int | None:
    """The data.max_token_length an artifact was trained with (None: the plain window, or a file that does not
    say)."""
    return (trained_recipe(path).get("data") or {}).get("max_token_length")


def trained_resolution(path: str | os.PathLike) -> int | None:
    """The data.resolution (pixels, the side of a square) an artifact was trained at; None where it does not
    say."""
    value = (trained_recipe(path).get("data") or {}).get("resolution")
    return value if isinstance(value, int) and value > 0 else None


def load_adapter(pipe: Any, path: str | os.PathLike, scale: float = 1.0, name: str | None = None) -> str:
    """Load an adapter file into `pipe` at strength `scale`; returns the adapter's name in the pipeline.
    LoRA, LoHa, LoKr: `scale` weights the update (0: the base). DoRA: it weights the direction update only, the
    learned magnitudes stay. OFT: scale 1 only (a rotation has no strength)."""
    name = name or Path(path).stem.replace(".", "_")
    try:
        if str(path).endswith(".pt"):
            return load_a1111_pt(pipe, str(path), scale, name)
        return _adapter_format(path).load(pipe, str(path), scale, name)
    except RuntimeError as exc:  # the loaders' load_state_dict: torch's "size mismatch for ..."
        raise another_base_error(exc, str(path)) or exc from None


def unload_adapter(pipe: Any, name: str | None = None) -> list[str]:
    """Remove a loaded hypernetwork or LoRA (LoHa, LoKr, OFT too) by the name `load_adapter` returned (None:
    every hypernetwork); the pipeline then predicts as before. Returns what was removed.
    (Embeddings: diffusers' `pipe.unload_textual_inversion()`.)"""
    denoiser = denoiser_of(pipe)
    if name is None or name in hypernetworks.loaded(denoiser):
        return hypernetworks.detach(denoiser, name)
    modules = adaptable_modules(pipe).values()
    holders = [m for m in modules if name in peft_layers.adapter_names(m)]
    if not holders:
        loras = sorted({n for m in modules for n in peft_layers.adapter_names(m)})
        raise ValueError(f"no adapter named {name!r} is loaded (hypernetworks: "
                         f"{list(hypernetworks.loaded(denoiser))}, LoRAs: {loras})")
    for module in holders:
        peft_layers.remove(module, name)
    return [name]
