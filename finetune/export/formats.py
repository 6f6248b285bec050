"""Every file format finetune reads or writes, behind one registry.

A format says how to tell its files (`detect`, on the header's metadata and tensor names), what `finetune inspect`
says of them (`describe`), and where it has them, how to read them (`read`), write them (`write`, from what a
`read` of its family gives) and load them into a diffusers pipeline (`load`: finetune.load_adapter). The header is
read once (safetensors_io.read_header) and the formats are tried in the order registered; the first whose `detect`
says yes names the file. The order matters for files more than one format could claim: LoRA (either layout)
first, then LyCORIS and finetune's peft-adapter file, diffusers' embeddings before AUTOMATIC1111's one-key file,
hypernetworks, and last the single-file checkpoint, which is no adapter.

This module imports the format modules and none of them imports it: the one direction is
data model (lora/layers.py) <- readers and writers <- registry.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

from finetune.export import adapter_files
from finetune.export import hypernetwork as hypernetwork_files
from finetune.export.lora import comfyui, diffusers, kohya, lycoris, peft_adapter
from finetune.export.lora import files as lora_files
from finetune.export.lora import loading as lora_loading
from finetune.export.single_file import UNET_PREFIX
from finetune.io.safetensors_io import Header, read_header

Detector = Callable[[dict[str, str], list[str]], bool]  # (header metadata, tensor names) -> is it this format
Describer = Callable[[Header], dict[str, Any]]  # -> {"kind": what inspect says, and what else it shows}
Reader = Callable[..., Any]  # (path, module_names=None) -> the family's content (LoraWeights, AdapterFile, ...)
Writer = Callable[[Any, "str | os.PathLike"], Any]  # (the family's content, path) -> the path written
Loader = Callable[[Any, str, float, str], str]  # (pipe, path, scale, name) -> the adapter's name in the pipeline


class UnknownFormatError(ValueError):
    """A file that no registered format detects."""


@dataclass(frozen=True)
class FileFormat:
    name: str  # what finetune.adapters.detect_format says: "lora", "lycoris", ...
    family: str  # what `read` gives and `write` takes; `finetune convert` moves files within a family
    detect: Detector
    describe: Describer
    layout: Optional[str] = None  # its name for `finetune convert --to` and strategy.formats: diffusers, kohya, comfyui
    read: Optional[Reader] = None
    write: Optional[Writer] = None
    load: Optional[Loader] = None


FORMATS: list[FileFormat] = []  # in detection order


def register(file_format: FileFormat) -> FileFormat:
    """Add a format; it is tried after every one registered before it."""
    if any((f.name, f.layout) == (file_format.name, file_format.layout) for f in FORMATS):
        raise ValueError(f"format {file_format.name!r} ({file_format.layout}) is registered already")
    FORMATS.append(file_format)
    return file_format


def names(loadable: bool = False) -> list[str]:
    """Format names in detection order, each once; `loadable`: only those load_adapter puts into a pipeline."""
    return list(dict.fromkeys(f.name for f in FORMATS if f.load is not None or not loadable))


def find(metadata: dict[str, str], keys: list[str], loadable: bool = False) -> Optional[FileFormat]:
    """The first format (of those that load into a pipeline, with `loadable`) that detects this header; None if
    none does."""
    return next((f for f in FORMATS if (f.load is not None or not loadable) and f.detect(metadata, keys)), None)


def detect(path: str | os.PathLike, loadable: bool = False) -> FileFormat:
    """The format of the .safetensors file at `path`; UnknownFormatError names the formats tried."""
    header = read_header(path)
    found = find(header.metadata, header.keys, loadable)
    if found is None:
        raise UnknownFormatError(f"{path}: not {'an adapter' if loadable else 'a file'} format finetune knows "
                                 f"(formats: {', '.join(names(loadable))})")
    return found


def describe(header: Header) -> dict[str, Any]:
    """What `finetune inspect` says of a file with this header: {"kind": ..., and what its format adds}."""
    found = find(header.metadata, header.keys)
    return found.describe(header) if found else {"kind": "safetensors weights of an unknown kind"}


def writer(family: str, layout: str) -> FileFormat:
    """The format of `family` that `layout` ("diffusers" or "kohya") names: what convert writes."""
    for file_format in FORMATS:
        if file_format.family == family and file_format.layout == layout and file_format.write is not None:
            return file_format
    raise KeyError(f"no {family} format is written in the {layout} layout")


def _is_checkpoint(metadata: dict[str, str], keys: list[str]) -> bool:
    return any(k.startswith(UNET_PREFIX) for k in keys)


def _describe_checkpoint(header: Header) -> dict[str, Any]:
    return {"kind": "single-file checkpoint (original Stable Diffusion layout)"}


# LoRA in each layout first: diffusers' keys, kohya's and ComfyUI's never overlap, and all load as "lora"
register(FileFormat("lora", "lora", lora_files.is_comfyui_lora, lora_files.describe_comfyui_lora,
                    layout="comfyui", read=lora_files.read_lora, write=comfyui.write_comfyui_file,
                    load=lora_loading.load_lora))
register(FileFormat("lora", "lora", lora_files.is_diffusers_lora, lora_files.describe_diffusers_lora,
                    layout="diffusers", read=lora_files.read_lora, write=diffusers.write_diffusers,
                    load=lora_loading.load_lora))
register(FileFormat("lora", "lora", lora_files.is_kohya_lora, lora_files.describe_kohya_lora, layout="kohya",
                    read=lora_files.read_lora, write=kohya.write_kohya, load=lora_loading.load_lora))
# LoHa and LoKr: LyCORIS's layout (kohya names) and finetune's peft-adapter file (OFT too)
register(FileFormat("lycoris", "lora_variant", lambda metadata, keys: lycoris.is_lycoris(keys),
                    lora_files.describe_lycoris, layout="kohya", read=lycoris.read_lycoris_file,
                    write=lycoris.write_lycoris_file, load=lora_loading.load_lycoris))
register(FileFormat("peft_adapter", "lora_variant", peft_adapter.is_peft_adapter, lora_files.describe_peft_adapter,
                    layout="diffusers", read=peft_adapter.read_peft_adapter_file,
                    write=peft_adapter.write_peft_adapter_file, load=peft_adapter.load_peft_adapter))
# before the diffusers one, whose {token: tensor} keys it would pass for
register(FileFormat("sdxl_embedding", "embedding", adapter_files.is_per_encoder_embedding,
                    adapter_files.describe_per_encoder_embedding, load=adapter_files.load_per_encoder_embedding))
register(FileFormat("textual_inversion", "embedding", adapter_files.is_diffusers_embedding,
                    adapter_files.describe_diffusers_embedding, layout="diffusers",
                    read=adapter_files.read_diffusers_embedding, write=adapter_files.write_diffusers_embedding,
                    load=adapter_files.load_diffusers_embedding))
register(FileFormat("a1111_embedding", "embedding", adapter_files.is_a1111_embedding,
                    adapter_files.describe_a1111_embedding, layout="kohya", read=adapter_files.read_a1111_embedding,
                    write=adapter_files.write_a1111_embedding, load=adapter_files.load_a1111_embedding))
register(FileFormat("hypernetwork", "hypernetwork", hypernetwork_files.is_hypernetwork_file,
                    adapter_files.describe_hypernetwork, read=adapter_files.read_hypernetwork,
                    load=adapter_files.load_hypernetwork))
# named by inspect, refused by load_adapter (no loader): `finetune merge` writes these, it does not read them
register(FileFormat("single_file", "checkpoint", _is_checkpoint, _describe_checkpoint))
