"""Frozen parts the caches made idle leave the accelerator's memory, and come back only while they are needed.

On a GPU they move to the CPU. On a CPU the RAM is the accelerator's memory, so their weights move to a
memory-mapped scratch file (unlinked at once, so nothing is left behind): the pages are read back only while a
sample grid or a saved pipeline needs them, and the operating system may drop them again.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from finetune.export.pickle_files import save_pickle
from finetune.file_errors import writing
from finetune.paths import cache_home


def scratch_dir() -> Path:
    return cache_home() / "offload"


def offload(module: torch.nn.Module, device: torch.device) -> None:
    if device.type != "cpu":
        module.to("cpu")
        return
    folder = scratch_dir()
    with writing(folder, "the offload scratch file (set $FINETUNE_CACHE elsewhere, or cache.offload: false)"):
        folder.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(dir=folder, suffix=".pt")
        os.close(handle)
        try:
            save_pickle(module.state_dict(), name)
            mapped = torch.load(name, mmap=True, weights_only=True, map_location="cpu")
        finally:
            os.unlink(name)  # the mapping stays valid; the file disappears with the process
    module.load_state_dict(mapped, assign=True)


@contextmanager
def on_device(modules: list[torch.nn.Module], device: torch.device):
    """Within the context the modules are on `device` (a no-op where they already are, or on a CPU)."""
    moved = [m for m in modules if device.type != "cpu" and next(m.parameters()).device != device]
    for module in moved:
        module.to(device)
    try:
        yield
    finally:
        for module in moved:
            module.to("cpu")


def offload_idle(parts, latents_cached: bool, text_cached: bool, device: torch.device) -> list[torch.nn.Module]:
    """Once the caches hold everything, the VAE (latents cached) and the text encoders (text cached) of `parts`
    (Components) leave the accelerator; they come back only for sample grids (`on_device`). Returns them."""
    idle = [parts.vae] if latents_cached else []
    if text_cached:
        idle += list(parts.text_encoder_modules().values())
    for module in idle:
        offload(module, device)
    return idle
