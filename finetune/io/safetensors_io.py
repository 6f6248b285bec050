"""Write safetensors files atomically, with string metadata in the header; read that header back.

Every read and write goes through finetune/file_errors.py: a truncated file, a full disk or a read-only folder
ends in one message naming the file, not in a traceback."""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from finetune.file_errors import reading, writing
from finetune.io.atomic import atomic_file
from finetune.paths import give_umask_permissions


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None, what: str = "the file") -> Path:
    """Write `path` whole or not at all. Raises FileProblem (naming `what` and `path`) on a full disk or a
    folder that cannot be written; no temporary file is left either way."""
    path = Path(path)
    plain = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with writing(path, what), atomic_file(path) as tmp:
        save_file(plain, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
        sort_metadata(tmp)
        give_umask_permissions(tmp)
    return path


def sort_metadata(path: Path) -> None:
    """Rewrite the header in place with its metadata keys sorted, so the same tensors and metadata give the same
    bytes: safetensors (0.8 still, upstream issue safetensors#584) writes them in a random order on every save."""
    with open(path, "r+b") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
        if "__metadata__" not in header:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        # compact and unescaped like serde_json's: the same keys and values reordered take the same room
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= size:  # otherwise keep the file as written: valid, only not canonical
            handle.seek(8)
            handle.write(text.ljust(size, b" "))  # safetensors pads its header with spaces too


def read_metadata(path: str | os.PathLike, what: str = "file") -> dict[str, str]:
    """The header's metadata; FileProblem (naming `what` and `path`) when the file is missing or damaged."""
    with reading(path, what), safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


@dataclass
class Header:
    """What a .safetensors file says before its tensor data: its metadata, and each tensor's shape and dtype (in
    the file's order). Enough to tell which format the file is (finetune/export/formats.py) and describe it."""

    path: str
    metadata: dict[str, str]
    shapes: dict[str, list[int]]
    dtypes: dict[str, str]

    @property
    def keys(self) -> list[str]:
        return list(self.shapes)


def read_header(path: str | os.PathLike, what: str = "file") -> Header:
    """The file's Header; no tensor data is read. FileProblem when the file is missing or damaged (a file cut
    short fails here already: safetensors checks that the header's offsets cover the file exactly)."""
    with reading(path, what), safe_open(str(path), framework="pt") as handle:
        slices = {key: handle.get_slice(key) for key in handle.keys()}
        return Header(str(path), dict(handle.metadata() or {}),
                      {key: list(piece.get_shape()) for key, piece in slices.items()},
                      {key: str(piece.get_dtype()) for key, piece in slices.items()})


def read_safetensors(path: str | os.PathLike, what: str = "file",
                     fix: str = "download or copy it again") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of the file, and its header metadata. FileProblem (naming `what` and `path`, saying `fix`)
    when the file is missing or damaged."""
    with reading(path, what, fix), safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})


def load_tensors(path: str | os.PathLike, what: str = "file", fix: str = "download or copy it again"
                 ) -> dict[str, torch.Tensor]:
    """Every tensor of the file (safetensors' load_file), with read_safetensors' errors."""
    return read_safetensors(path, what, fix)[0]


def training_metadata(*, base_model: str, strategy: str, steps: int, recipe: dict,
                      extra: dict[str, object] | None = None) -> dict[str, str]:
    """The `finetune.*` header keys every artifact carries."""
    from finetune import __version__

    meta = {
        "finetune.version": __version__,
        "finetune.base_model": base_model,
        "finetune.strategy": strategy,
        "finetune.steps": str(steps),
        "finetune.recipe": json.dumps(recipe, sort_keys=True),
    }
    for key, value in (extra or {}).items():
        meta[f"finetune.{key}"] = str(value)
    return meta
