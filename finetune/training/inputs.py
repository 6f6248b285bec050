"""The one place a step turns a batch into model inputs: latents for its images and conditioning for its
captions, from the caches (finetune/data/caches.py) where they are on, encoded live where not."""
from __future__ import annotations

import logging
import os
from functools import partial
from pathlib import Path
from typing import Any

import torch

from finetune.data.caches import CachePlan, LatentStore, TextCache, default_latent_dir, fill, vae_identity
from finetune.data.sources import Example
from finetune.file_errors import FileProblem, unwritable_folder
from finetune.models.base import Components, ModelFamily

log = logging.getLogger(__name__)


class BatchEncoder:
    """Latents for a batch and conditioning for captions, from the caches where they are on."""

    def __init__(self, family: ModelFamily, parts: Components, device: torch.device,
                 latents: LatentStore | None = None, text: TextCache | None = None, show_progress: bool = False):
        self.family = family
        self.parts = parts  # the frozen base the caches are filled from
        self.device = device
        self.latent_store = latents
        self.text = text
        self.show_progress = show_progress
        self._vae_id: str | None = None

    def cache_latents(self, examples: list[Example], sizes: list[tuple[int, int]], flips: bool,
                      what: str) -> dict[tuple[int, bool], str] | None:
        """Fill the latent cache for these images; the keys their dataset hands out (None: cache off)."""
        if self.latent_store is None:
            return None
        if self._vae_id is None:
            self._vae_id = vae_identity(self.parts.vae)
        encode = partial(self.family.encode_image_moments, self.parts)
        keys, encoded = fill(self.latent_store, examples, sizes, flips, self._vae_id, encode, what,
                             show_progress=self.show_progress)
        where = self.latent_store.folder or "memory"
        log.info("latent cache (%s): %d variant(s) of %d %s, %d encoded now", where, len(keys), len(examples),
                 what, encoded)
        return keys

    def cache_text(self, captions: list[str]) -> None:
        if self.text is not None:
            self.text.fill(captions)

    def latents(self, parts: Components, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        if "latent_keys" in batch:
            mean, std = self.latent_store.get(batch["latent_keys"])
            mean, std = mean.to(self.device), std.to(self.device)
        else:
            with torch.no_grad():
                mean, std = self.family.encode_image_moments(parts, batch["pixel_values"])
        return self.family.latents_from_moments(parts, mean, std, generator)

    def conditioning(self, parts: Components, captions: list[str], text_encoder_trains: bool) -> Any:
        if self.text is None or text_encoder_trains:
            return self.family.encode_prompts(parts, captions)
        return self.text.get(captions, self.device)


def make_encoder(family: ModelFamily, parts: Components, plan: CachePlan, device: torch.device,
                 latent_dir: str | None, show_progress: bool = False) -> BatchEncoder:
    store = None
    if plan.latents == "memory":
        store = LatentStore()
    elif plan.latents == "disk":
        folder = Path(os.path.expanduser(latent_dir)) if latent_dir else default_latent_dir()
        blocked = unwritable_folder(folder)
        if blocked is not None:  # cache.latents: auto chose the disk (a large dataset); recipe checks saw "auto"
            raise FileProblem(f"the latent cache (cache.latents: auto, on disk for this dataset) keeps its entries "
                              f"in {folder}, but {blocked} cannot be written (a read-only disk, or no permission). "
                              "Set cache.dir (or $FINETUNE_CACHE) to a folder you can write to", blocked)
        store = LatentStore(folder)
    text = TextCache(partial(family.encode_prompts, parts)) if plan.text else None
    return BatchEncoder(family, parts, device, store, text, show_progress)
