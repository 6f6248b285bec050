"""Where the toolkit keeps what it can rebuild (class images, latents, benchmark models, offload scratch)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_home() -> Path:
    """$FINETUNE_CACHE, else ~/.cache/finetune."""
    return Path(os.environ.get("FINETUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "finetune"))


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write to a temporary name beside `path`, then rename: a reader sees the old file or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # only left when the write failed (a full disk)
    return path
