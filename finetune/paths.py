"""Where the toolkit keeps what it can rebuild (class images, latents, benchmark models, offload scratch)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_home() -> Path:
    """$FINETUNE_CACHE, else ~/.cache/finetune."""
    return Path(os.environ.get("FINETUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "finetune"))


def current_umask() -> int:
    """The process's umask (os.umask can only be read by setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_umask_permissions(path: str | os.PathLike) -> None:
    """Give a file, or a folder and everything under it, the permissions a plain `open` would have given it
    (0666 / 0777 less the umask). safetensors' save_file (0.8, also through diffusers' save_pretrained) creates
    its files 0600 whatever the umask, so others could not read what finetune wrote."""
    mask = current_umask()
    path = Path(path)
    for item in [path, *(path.rglob("*") if path.is_dir() else [])]:
        if not item.is_symlink():
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)
