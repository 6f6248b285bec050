"""Reading the pickled `.pt` files other UIs write, without ever running code from them."""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from finetune.file_errors import read_problem, writing
from finetune.io.atomic import atomic_file


class UnsafePickleError(ValueError):
    """A .pt that only loads by running arbitrary code."""


def load_plain_pickle(path: str | os.PathLike, what: str, mmap: bool = False,
                      fix: str = "download or copy it again") -> Any:
    """The file's contents if they are plain data (dicts, lists, numbers, strings, tensors); refused otherwise.

    `torch.load(weights_only=True)` rebuilds only those types, so a pickle that would call anything else
    (the way malicious files run code) fails here instead of running. Raises FileProblem (saying `fix`) for a
    missing, unreadable, truncated or damaged file, UnsafePickleError for a pickle that needs more.
    """
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except (OSError, EOFError, pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as exc:
        damaged = read_problem(exc, path, what, fix)
        if damaged is not None:
            raise damaged from None
        if isinstance(exc, OSError):
            raise
        raise UnsafePickleError(
            f"{path}: this {what} is a pickle that needs more than plain tensors and numbers to load (it could run "
            f"code), so finetune refused it ({type(exc).__name__}). Ask for a .safetensors version, or re-save it "
            "with plain data in a tool you trust") from None


def save_pickle(data: Any, path: str | os.PathLike) -> None:
    """torch.save through a Python file object: a full disk then surfaces as the OSError (ENOSPC) that
    file_errors reads, in the RuntimeError's context; given a file name torch writes itself and says only
    "unexpected pos" or "iostream error"."""
    with open(path, "wb") as handle:
        torch.save(data, handle)


def write_pickle_atomically(data: Any, path: Path, what: str = "the file") -> Path:
    """torch.save to a temporary name, then rename (finetune/io/atomic.py): readers see the old file or the
    whole new one. FileProblem on a full disk or a folder that cannot be written."""
    with writing(path, what), atomic_file(path) as tmp:
        save_pickle(data, tmp)
    return path
