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
from accelerate.utils import send_to_device

from finetune.file_errors import writing
from finetune.io.pickle_files import save_pickle
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


@contextmanager
def one_at_a_time(modules: list[torch.nn.Module], device: torch.device):
    """Within the context each of `modules` (on the CPU) comes to `device` only when its forward is called, and the
    one that ran before it goes back to the CPU first: the accelerator holds the largest of them, not their sum
    (HiDream's four text encoders: Llama's 16 GB in bf16, not 27 GB). Tensor arguments follow the module to
    `device`. Each call of a module that is not the last one used costs one transfer each way: for caching, where
    every encoder runs once per batch of captions. On leaving, the last one used returns to the CPU."""
    current: list[torch.nn.Module] = []

    def arrive(module, args, kwargs):
        if not current or current[0] is not module:
            if current:
                current.pop().to("cpu")
            module.to(device)
            current.append(module)
        return send_to_device((args, kwargs), device)

    handles = [module.register_forward_pre_hook(arrive, with_kwargs=True) for module in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        if current:
            current.pop().to("cpu")
