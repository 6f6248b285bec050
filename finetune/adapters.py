"""Apply a trained artifact to a diffusers pipeline. Each strategy's file format registers a loader here."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from safetensors import safe_open

from finetune.export.safetensors_io import read_metadata

# format name -> (detector on (metadata, keys), loader(pipe, path, scale, name) -> adapter name)
Detector = Callable[[dict[str, str], list[str]], bool]
Loader = Callable[[Any, str, float, str], str]
LOADERS: dict[str, tuple[Detector, Loader]] = {}


def register(name: str, detect: Detector, load: Loader) -> None:
    LOADERS[name] = (detect, load)


def detect_format(path: str | os.PathLike) -> str:
    path = str(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"{path}: expected a .safetensors adapter file")
    metadata = read_metadata(path)
    with safe_open(path, framework="pt") as handle:
        keys = list(handle.keys())
    for name, (detect, _) in LOADERS.items():
        if detect(metadata, keys):
            return name
    raise ValueError(f"{path}: not an adapter format finetune knows (formats: {', '.join(LOADERS)})")


def load_adapter(pipe: Any, path: str | os.PathLike, scale: float = 1.0, name: str | None = None) -> str:
    """Load an adapter file into `pipe` at strength `scale`; returns the adapter's name in the pipeline."""
    kind = detect_format(path)
    name = name or Path(path).stem.replace(".", "_")
    return LOADERS[kind][1](pipe, str(path), scale, name)


def _is_lora(metadata: dict[str, str], keys: list[str]) -> bool:
    return metadata.get("finetune.strategy") == "lora" or any(
        ".lora_A." in k or ".lora.down." in k or ".lora_down." in k for k in keys)


def _load_lora(pipe: Any, path: str, scale: float, name: str) -> str:
    # diffusers' own loader: what every diffusers user would call, with its checks and conversions
    pipe.load_lora_weights(path, adapter_name=name)
    pipe.set_adapters([name], adapter_weights=[scale])
    return name


register("lora", _is_lora, _load_lora)
