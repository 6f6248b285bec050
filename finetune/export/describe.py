"""What a model or adapter file (or a pipeline folder) is, for which base, what its header says, its shapes, and
what reads it: for `finetune inspect` (tools/inspect_file.py prints it) and the list of files a run wrote.

Reads headers and tensor shapes only (safetensors), or a pickle only if it is plain data; never runs code. What a
.safetensors file is, and what its format adds to the description, is the format registry's (export/formats.py).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from finetune.export import formats
from finetune.io.safetensors_io import read_header

# cross-attention width -> the Stable Diffusion release a file's layers fit (not one of finetune's families)
SD_RELEASE_BY_WIDTH = {768: "Stable Diffusion 1.x", 1024: "Stable Diffusion 2.x", 2048: "Stable Diffusion XL"}
_CHECKPOINT_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


# what reads each kind of file (by the start of its kind), for `inspect` and the end-of-run list
READ_BY = {
    "LoRA (diffusers/peft format)": "diffusers' pipe.load_lora_weights, finetune.load_adapter",
    "LoRA (kohya format": "AUTOMATIC1111 and Forge (models/Lora), ComfyUI's LoRA loader, kohya's scripts, "
                          "finetune.load_adapter",
    "LoRA (ComfyUI layout": "ComfyUI's LoRA loader, diffusers' pipe.load_lora_weights (for the families whose "
                            "converter reads it), finetune.load_adapter",
    "LyCORIS": "AUTOMATIC1111 and Forge (models/Lora), ComfyUI, finetune.load_adapter",
    **{f"{variant} adapter": "finetune.load_adapter (diffusers has no loader for it)"
       for variant in ("loha", "lokr", "oft")},
    "hypernetwork (finetune format)": "finetune.load_adapter (diffusers has no hypernetwork loader)",
    "hypernetwork (AUTOMATIC1111 .pt)": "AUTOMATIC1111 (models/hypernetworks), finetune.load_adapter",
    "textual-inversion embedding (AUTOMATIC1111": "AUTOMATIC1111 (embeddings/), ComfyUI, kohya; "
                                                  "finetune.load_adapter",
    "textual-inversion embedding (diffusers format)": "diffusers' pipe.load_textual_inversion, finetune.load_adapter",
    "textual-inversion embedding (SDXL": "AUTOMATIC1111 (embeddings/), ComfyUI, kohya; diffusers' "
                                         "pipe.load_textual_inversion once per text encoder (SDXL; SD3's pipeline "
                                         "has none); finetune.load_adapter",
    "diffusers pipeline": "diffusers' DiffusionPipeline.from_pretrained; finetune merge / extract-lora",
    "single-file checkpoint": "AUTOMATIC1111, ComfyUI, diffusers' from_single_file",
}


def read_by(kind: str) -> str | None:
    return next((readers for start, readers in READ_BY.items() if kind.startswith(start)), None)


def _family_from_width(width: int | None) -> str | None:
    if width is None:
        return None
    return SD_RELEASE_BY_WIDTH.get(width, f"unknown (cross-attention width {width}: no Stable Diffusion release; "
                                          "the shapes world's base is 64 wide, finetune's test models 32)")


def _cross_attention_width(shapes: dict[str, list[int]]) -> int | None:
    if _CHECKPOINT_KEY in shapes:
        return shapes[_CHECKPOINT_KEY][1]
    for key, shape in sorted(shapes.items()):
        if ("attn2.to_k" in key or "attn2_to_k" in key) and ("lora_A" in key or "lora_down" in key
                                                             or "lora.down" in key):
            return shape[1]
    for key, shape in shapes.items():  # an embedding: its width is the text encoder's
        if "." not in key and len(shape) == 2:
            return shape[1]
    return None


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """What the file or pipeline folder at `path` is: {"kind", "read_by", "base_model", shapes, metadata, ...}."""
    info = _describe(Path(path))
    info["read_by"] = read_by(info["kind"])
    return info


def _describe(path: Path) -> dict[str, Any]:
    if path.is_dir():
        return _describe_folder(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.suffix != ".safetensors":
        return _describe_pickle(path)
    header = read_header(path)
    metadata, shapes = header.metadata, header.shapes
    described = formats.describe(header)
    info: dict[str, Any] = {"file": str(path), "kind": described.pop("kind"), "bytes": path.stat().st_size,
                            "tensors": len(shapes), "parameters": sum(_numel(s) for s in shapes.values()),
                            "dtypes": dict(Counter(header.dtypes.values()))}
    info["base_model"] = metadata.get("finetune.base_model") or metadata.get("ss_sd_model_name")
    info["base_family"] = (_family_from_width(_cross_attention_width(shapes))
                           or metadata.get("ss_base_model_version") or metadata.get("modelspec.architecture"))
    info.update(described)  # what the format adds: a LoRA's modules and ranks per component
    info["metadata"] = metadata
    info["shapes"] = shapes
    return info


def _numel(shape: list[int]) -> int:
    count = 1
    for side in shape:
        count *= side
    return count


def _describe_folder(path: Path) -> dict[str, Any]:
    index = path / "model_index.json"
    if not index.is_file():
        raise ValueError(f"{path}: a folder, but not a diffusers pipeline (no model_index.json)")
    listing = json.loads(index.read_text())
    components = {k: v[1] if isinstance(v, list) else v for k, v in listing.items() if not k.startswith("_")}
    info: dict[str, Any] = {"file": str(path), "kind": f"diffusers pipeline ({listing.get('_class_name')})",
                            "components": components}
    trained = path / "finetune.json"
    info["metadata"] = json.loads(trained.read_text()) if trained.is_file() else {}
    info["base_model"] = info["metadata"].get("finetune.base_model")
    return info


def _describe_pickle(path: Path) -> dict[str, Any]:
    from finetune.io.pickle_files import load_plain_pickle

    data = load_plain_pickle(path, "pickle file")  # refuses anything but plain data, so nothing runs
    info: dict[str, Any] = {"file": str(path), "bytes": path.stat().st_size}
    if isinstance(data, dict) and "string_to_param" in data:
        info["kind"] = "textual-inversion embedding (AUTOMATIC1111 .pt)"
        vectors = data["string_to_param"].get("*")
        info["shapes"] = {"string_to_param.*": list(getattr(vectors, "shape", []))}
        info["metadata"] = {k: str(data[k]) for k in ("name", "step", "sd_checkpoint_name") if k in data}
    elif isinstance(data, dict) and any(isinstance(key, int) for key in data):
        info["kind"] = "hypernetwork (AUTOMATIC1111 .pt)"
        info["metadata"] = {k: str(v) for k, v in data.items() if isinstance(k, str)}
        info["shapes"] = {"context widths": [k for k in data if isinstance(k, int)]}
    else:
        state = data.get("state_dict", data) if isinstance(data, dict) else {}
        info["kind"] = "pickled checkpoint" if state else "pickle of an unknown kind"
        info["tensors"] = len(state)
        info["metadata"] = {}
    return info

