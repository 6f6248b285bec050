"""Where the toolkit keeps what it can rebuild (class images, latents, benchmark models, offload scratch)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_home() -> Path:
    """$FINETUNE_CACHE, else ~/.cache/finetune."""
    return Path(os.environ.get("FINETUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "finetune"))
