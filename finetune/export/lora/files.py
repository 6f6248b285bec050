"""LoRA-family files as wholes: which layout a file is in, reading it as layers, what `finetune inspect` says of
it, and the files a training run writes for `strategy.formats`.

Layouts: diffusers' LoRA file (diffusers.py) and kohya's (kohya.py) hold LoRA layers; finetune's peft-adapter
file (peft_adapter.py) and LyCORIS's (lycoris.py) hold LoHa and LoKr (OFT: the peft-adapter file only).
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from finetune.export.lora import comfyui, diffusers, kohya, lycoris, peft_adapter
from finetune.export.lora.kohya_names import SD_NAMING, KohyaNaming
from finetune.export.lora.layers import VARIANT_KEY, LoraFileError, LoraWeights
from finetune.io.safetensors_io import Header, read_safetensors

KOHYA_DIR = "kohya"  # a run's kohya or LyCORIS file: output_dir/kohya/<output_dir name>.safetensors
# a LoRA factor's key in diffusers' layout (peft's, the older one) or kohya's
_LORA_KEY_PARTS = (".lora_A.", ".lora.down.", ".lora_down.")
_DOWN_TAILS = (".lora_A.weight", ".lora.down.weight", ".lora_down.weight")


def is_lora(metadata: dict[str, str], keys: list[str]) -> bool:
    """A LoRA file in either layout (LoHa, LoKr and OFT are not, in peft's layout or LyCORIS's)."""
    if metadata.get(VARIANT_KEY, "lora") != "lora" or lycoris.is_lycoris(keys):
        return False
    return metadata.get("finetune.strategy") == "lora" or any(part in k for k in keys for part in _LORA_KEY_PARTS)


def is_kohya_lora(metadata: dict[str, str], keys: list[str]) -> bool:
    return is_lora(metadata, keys) and kohya.is_kohya(keys)


def is_diffusers_lora(metadata: dict[str, str], keys: list[str]) -> bool:
    return is_lora(metadata, keys) and not kohya.is_kohya(keys) and not comfyui.is_comfyui(keys)


def is_comfyui_lora(metadata: dict[str, str], keys: list[str]) -> bool:
    return is_lora(metadata, keys) and comfyui.is_comfyui(keys)


def check_path(path: str | os.PathLike) -> None:
    """Refuse, with the reason, a path that is not an existing .safetensors file."""
    if not str(path).endswith(".safetensors"):
        raise LoraFileError(f"{path}: expected a .safetensors LoRA file")
    if not Path(path).is_file():
        raise LoraFileError(f"{path}: no such file")


def read_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a .safetensors file and its header (LoraFileError for a missing or other file)."""
    check_path(path)
    return read_safetensors(path)


def read_lora(path: str | os.PathLike, module_names: dict[str, list[str]] | None = None) -> LoraWeights:
    """Any LoRA file this toolkit knows (diffusers/peft or kohya), as layers. `module_names` (component -> the
    model's module paths) resolves kohya's underscored names exactly; without it they are parsed."""
    tensors, metadata = read_tensors(path)
    if not tensors:
        raise LoraFileError(f"{path}: holds no tensors")
    if kohya.is_kohya(list(tensors)):
        return kohya.from_kohya(tensors, metadata, str(path), module_names)
    if comfyui.is_comfyui(list(tensors)):
        return comfyui.read_comfyui(tensors, metadata, str(path), module_names)
    return diffusers.from_diffusers(tensors, metadata, str(path))


def lora_summary(shapes: dict[str, list[int]]) -> dict[str, Any]:
    """{component: {"modules": count, "ranks": {rank: count}}} of a LoRA file in either layout."""
    per_component: dict[str, Counter] = {}
    for key, shape in shapes.items():
        if key.endswith(_DOWN_TAILS):
            named = kohya.split_name(key.partition(".")[0])
            component = named[0] if named else key.partition(".")[0]
            per_component.setdefault(component, Counter())[shape[0]] += 1
    return {c: {"modules": sum(ranks.values()), "ranks": dict(sorted(ranks.items()))}
            for c, ranks in per_component.items()}


def describe_diffusers_lora(header: Header) -> dict[str, Any]:
    dora = " with DoRA" if any("magnitude" in k for k in header.keys) else ""
    return {"kind": f"LoRA (diffusers/peft format){dora}", "lora": lora_summary(header.shapes)}


def describe_comfyui_lora(header: Header) -> dict[str, Any]:
    return {"kind": "LoRA (ComfyUI layout: diffusion_model. + the original model's names)",
            "lora": {"transformer": {"modules": sum(k.endswith(".lora_A.weight") for k in header.keys)}}}


def describe_kohya_lora(header: Header) -> dict[str, Any]:
    return {"kind": "LoRA (kohya format: AUTOMATIC1111, ComfyUI)", "lora": lora_summary(header.shapes)}


def describe_lycoris(header: Header) -> dict[str, Any]:
    return {"kind": "LyCORIS LoHa/LoKr (kohya layout)"}


def describe_peft_adapter(header: Header) -> dict[str, Any]:
    return {"kind": f"{header.metadata.get(VARIANT_KEY)} adapter (finetune/peft format)"}


def write_lora_files(output_dir: str | os.PathLike, components: dict[str, dict[str, torch.Tensor]],
                     configs: dict[str, dict], metadata: dict[str, str], variant: str, formats: list[str],
                     naming: KohyaNaming = SD_NAMING, comfyui_names: Any = None) -> Path:
    """A trained adapter's files for `formats` (strategy.formats), from peft's per-component state dicts and
    configs as dicts: the diffusers-layout file always (diffusers' LoRA file; finetune's peft-adapter file for
    LoHa, LoKr and OFT, which diffusers has no loader for), and for "kohya" the kohya file (LyCORIS's layout for
    LoHa and LoKr) at output_dir/kohya/<output_dir name>.safetensors, named as `naming` (the model family's kohya
    names) says; for "comfyui" the transformer's layers in ComfyUI's layout at output_dir/comfyui/<name>.safetensors
    (`comfyui_names`: the family's OriginalNames). Returns the first file's path."""
    output_dir = Path(output_dir)
    path = output_dir / diffusers.FILE_NAME
    kohya_path = output_dir / KOHYA_DIR / f"{output_dir.name}.safetensors"
    if variant in peft_adapter.PEFT_ONLY_VARIANTS:
        saved = peft_adapter.save_peft_adapter(path, components, configs, metadata)
        if "kohya" in formats:
            lycoris.write_lycoris(variant, components, configs, kohya_path, metadata, naming)
        return saved
    saved = diffusers.save_lora(path, components, configs, metadata)
    # the same tensors and configs the diffusers file holds, viewed as layers (no reading it back)
    header = {**metadata, diffusers.ADAPTER_METADATA_KEY: diffusers.adapter_metadata(configs)}
    layers = diffusers.from_diffusers(diffusers.pack(components), header, str(path))
    if "kohya" in formats:
        kohya.write_kohya(layers, kohya_path, naming=naming)
    if "comfyui" in formats:
        comfyui.write_comfyui(layers, output_dir / comfyui.COMFYUI_DIR / f"{output_dir.name}.safetensors",
                              comfyui_names, metadata)
    return saved
