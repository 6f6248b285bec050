"""The folders outside output_dir that a run writes in (caches, scratch), checked before any model loads: a
read-only or forbidden `$FINETUNE_CACHE` or cache.dir would otherwise stop the run only after the model loaded."""
from __future__ import annotations

import os
from pathlib import Path

from finetune.file_errors import unwritable_folder
from finetune.recipe.schema import Recipe

_WHY = "cannot be written (a read-only disk, or no permission)"


def cache_folder_problems(recipe: Recipe) -> list[str]:
    """One line per folder the recipe will write in that cannot be written, each with what to set instead.
    The offload scratch file is written on a CPU only (on a GPU idle parts go to RAM)."""
    from finetune.data.caches import default_latent_dir
    from finetune.data.class_images import default_cache_root
    from finetune.training.engine import has_accelerator
    from finetune.training.offload import scratch_dir

    c, problems = recipe.cache, []
    if c.latents == "disk":
        folder = Path(os.path.expanduser(c.dir)) if c.dir else default_latent_dir()
        problems += _refused(folder, "cache.latents: disk keeps its entries in", "Set cache.dir (or $FINETUNE_CACHE) "
                             "to a folder you can write to, or cache.latents: memory")
    if c.offload and (c.latents != "off" or c.text != "off") and not has_accelerator():
        problems += _refused(scratch_dir(), "cache.offload keeps the idle encoders' weights in a scratch file in",
                             "Set $FINETUNE_CACHE to a folder you can write to, or cache.offload: false")
    if recipe.prior.mode == "class_images":
        folder = Path(os.path.expanduser(recipe.prior.class_data_dir or default_cache_root()))
        problems += _refused(folder, "prior.mode: class_images keeps the class images in",
                             "Set prior.class_data_dir (or $FINETUNE_CACHE) to a folder you can write to")
    return problems


def _refused(folder: Path, what: str, fix: str) -> list[str]:
    blocked = unwritable_folder(folder)
    return [] if blocked is None else [f"{what} {folder}, but {blocked} {_WHY}. {fix}"]
