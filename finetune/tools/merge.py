"""`finetune merge`: fuse one or more adapters, each at its ratio, into the base's weights; save the result as a
diffusers pipeline folder or one original-layout `.safetensors` checkpoint (what AUTOMATIC1111 loads).

Each adapter is loaded the way `finetune.load_adapter` does (so every format it reads can be merged), fused into
the weights by peft's own `merge`, and its layers removed before the next one loads: merges add up, and the result
needs neither peft nor the adapter at inference.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from finetune.export.lora.layers import LoraFileError
from finetune.networks import peft_layers

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_adapter_argument(text: str) -> tuple[str, float]:
    """`FILE` or `FILE:RATIO` (a Windows drive letter's colon is not a ratio)."""
    path, sep, ratio = text.rpartition(":")
    if not sep or not path or "/" in ratio or "\\" in ratio:
        return text, 1.0
    try:
        return path, float(ratio)
    except ValueError:
        raise LoraFileError(f"--lora {text!r}: the part after the last ':' should be a ratio such as 0.8") from None


def merge(base: str, adapters: list[tuple[str, float]], out: str | Path, save_dtype: str = "fp16") -> list[str]:
    """Returns one line per fused adapter."""
    from finetune.adapters import check_adapter_file, load_adapter
    from finetune.export.single_file_writers import write_single_file
    from finetune.models import family_for
    from finetune.models.base import adaptable_modules

    out = Path(out)
    if not adapters:
        raise LoraFileError("give at least one --lora FILE[:RATIO]")
    if save_dtype not in DTYPES:
        raise LoraFileError(f"--save-dtype: one of {', '.join(DTYPES)}, got {save_dtype!r}")
    single_file = out.suffix in (".safetensors", ".ckpt")
    if out.suffix == ".ckpt":
        raise LoraFileError(f"{out}: finetune never writes pickles; name the checkpoint .safetensors")
    for path, _ in adapters:
        if not Path(path).is_file():
            raise LoraFileError(f"--lora: {path}: no such file")
        check_adapter_file(path)  # a file cut short fails here, before the base loads
    family = family_for("auto", base, hub=True)
    parts = family.load(base)
    pipe = family.pipeline(parts)
    lines = []
    for index, (path, ratio) in enumerate(adapters):
        try:
            name = load_adapter(pipe, path, scale=ratio, name=f"merge_{index}")
        except (ValueError, RuntimeError) as exc:
            raise LoraFileError(f"--lora {path}: could not load it onto {base}: {exc}") from None
        layers = sum(peft_layers.fuse(module) for module in adaptable_modules(pipe).values())
        lines.append(f"fused {path} at {ratio:g} ({layers} layers, adapter {name})")
    if single_file:
        write_single_file(family, parts, out, metadata=_merge_metadata(base, adapters), dtype=DTYPES[save_dtype])
    else:
        _save_folder(pipe, out, DTYPES[save_dtype], _merge_metadata(base, adapters))
    return lines


def _merge_metadata(base: str, adapters: list[tuple[str, float]]) -> dict[str, str]:
    from finetune import __version__

    return {"finetune.version": __version__, "finetune.base_model": base,
            "finetune.merged": json.dumps([{"file": str(p), "ratio": r} for p, r in adapters])}


def _save_folder(pipe, out: Path, dtype: torch.dtype, metadata: dict[str, str]) -> None:
    """Write the pipeline beside `out` under a temporary name, then rename: no half-written folder is left."""
    from finetune.io.atomic import atomic_dir, write_text_atomically
    from finetune.paths import give_umask_permissions

    if out.exists() and not (out / "model_index.json").is_file():
        raise LoraFileError(f"{out}: exists and is not a pipeline folder; choose a new folder for the merge")
    # not synced, as before: the weights reach the disk in their own time
    with atomic_dir(out, durable=False) as tmp:
        pipe.to(dtype).save_pretrained(tmp, safe_serialization=True)
        write_text_atomically(tmp / "finetune.json", json.dumps(metadata, indent=2))
        give_umask_permissions(tmp)
