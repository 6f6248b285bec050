"""Reading the pickled `.pt` files other UIs write, without ever running code from them."""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from finetune.export.safetensors_io import atomic_path, replace_atomically


class UnsafePickleError(ValueError):
    """A .pt that only loads by running arbitrary code."""


def load_plain_pickle(path: str | os.PathLike, what: str, mmap: bool = False) -> Any:
    """The file's contents if they are plain data (dicts, lists, numbers, strings, tensors); refused otherwise.

    `torch.load(weights_only=True)` rebuilds only those types, so a pickle that would call anything else
    (the way malicious files run code) fails here instead of running.
    """
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as exc:
        raise UnsafePickleError(
            f"{path}: this {what} is a pickle that needs more than plain tensors and numbers to load (it could run "
            f"code), so finetune refused it ({type(exc).__name__}). Ask for a .safetensors version, or re-save it "
            "with plain data in a tool you trust") from None


def write_pickle_atomically(data: Any, path: Path) -> Path:
    """torch.save to a temporary name, then rename: readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(path)
    try:
        torch.save(data, tmp)
        replace_atomically(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
