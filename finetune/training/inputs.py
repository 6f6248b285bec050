"""The one place a step turns a batch into model inputs: latents for its images and conditioning for its
captions, from the caches (finetune/data/caches.py) where they are on, encoded live where not; and the batches
moved to the device one step ahead (`ahead_on_device`), so a step never waits for its inputs' copy."""
from __future__ import annotations

import logging
import os
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import torch

from finetune.data.caches import (CachePlan, LatentStore, TextCache, default_latent_dir, fill, fill_controls,
                                   vae_identity)
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

    def cache_controls(self, examples: list[Example], sizes: list[tuple[int, int]],
                       control_sizes: list[tuple[tuple[int, int], ...]] | None, resize: str,
                       flips: bool) -> dict[tuple[int, bool], list[str]] | None:
        """Fill the latent cache with the examples' control images (data.control); the keys, one per slot, their
        dataset hands out (None: cache off, or no control images)."""
        if self.latent_store is None or control_sizes is None:
            return None
        if self._vae_id is None:
            self._vae_id = vae_identity(self.parts.vae)
        encode = partial(self.family.encode_image_moments, self.parts)
        keys, encoded = fill_controls(self.latent_store, examples, sizes, control_sizes, resize, flips, self._vae_id,
                                      encode, show_progress=self.show_progress)
        log.info("latent cache (%s): %d variant(s) of the control images of %d training images, %d encoded now",
                 self.latent_store.folder or "memory", len(keys), len(examples), encoded)
        return keys

    def control_latents(self, parts: Components, batch: dict[str, Any]) -> list[torch.Tensor]:
        """The batch's control latents, one [batch, c, h_i, w_i] per slot on the device (`family.control_latents`:
        the VAE's mode, normalised): from the cache where it is on, else encoded now. Empty without data.control."""
        if "control_means" in batch:  # read from the cache and moved ahead (ahead_on_device)
            means = batch["control_means"]
        elif "control_latent_keys" in batch:
            means = self.cached_control_means(batch["control_latent_keys"])
        elif "control_pixel_values" in batch:
            with torch.no_grad():
                means = [self.family.encode_image_moments(parts, to_device(pixels, self.device))[0]
                         for pixels in batch["control_pixel_values"]]
        else:
            return []
        with torch.no_grad():
            return [self.family.control_latents(parts, mean) for mean in means]

    def cached_control_means(self, keys: list[list[str]]) -> list[torch.Tensor]:
        """The latent cache's means for a batch's control keys (one list per slot), on the device."""
        return [to_device(self.latent_store.get(slot)[0], self.device) for slot in keys]

    def cache_text(self, captions: list[str]) -> None:
        if self.text is not None:
            self.text.fill(captions)

    def latents(self, parts: Components, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        if "latent_moments" in batch:  # read from the cache and moved ahead (ahead_on_device)
            mean, std = batch["latent_moments"]
        elif "latent_keys" in batch:
            mean, std = self.cached_moments(batch["latent_keys"])
        else:
            with torch.no_grad():
                mean, std = self.family.encode_image_moments(parts, batch["pixel_values"])
        return self.family.latents_from_moments(parts, mean, std, generator)

    def cached_moments(self, keys: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The latent cache's (mean, std) for a batch's keys, on the device (copied without waiting for it)."""
        mean, std = self.latent_store.get(keys)
        return to_device(mean, self.device), to_device(std, self.device)

    def masks(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """The batch's loss masks (data/masks.py) on the device: [batch, 1, H, W] with its pixels, at the latent's
        size from the latent cache; None without data.masks."""
        if "masks" in batch:
            return to_device(batch["masks"], self.device)
        if "latent_keys" in batch and self.latent_store is not None:
            masks = self.latent_store.masks(batch["latent_keys"])
            return None if masks is None else to_device(masks, self.device)
        return None

    def conditioning(self, parts: Components, captions: list[str], text_encoder_trains: bool) -> Any:
        if self.text is None or text_encoder_trains:
            return self.family.encode_prompts(parts, captions)
        return self.text.get(captions, self.device)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`, the copy from the host queued without waiting for the device: from pinned (page-locked)
    memory, the only kind a GPU copies from asynchronously (a tensor on the host is pinned first, a small copy on
    the host). Unchanged when already there."""
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def ahead_on_device(batches: Iterator[dict[str, Any]], encoder: BatchEncoder) -> Iterator[dict[str, Any]]:
    """The loader's batches with their tensors (pixels, conditions, loss masks, control images, and the cached latents
    their keys name, as `latent_moments` and `control_means`) on the encoder's device, each batch's copies queued
    while the step before it still runs: batch n + 1 is fetched and on its way when batch n is handed out. The
    batches are what they were (a pure function of their position, finetune/data/dataset.py); the loader reads one
    batch further than the run uses."""
    def moved(batch: dict[str, Any]) -> dict[str, Any]:
        batch = dict(batch, conditions={key: to_device(value, encoder.device)
                                        for key, value in batch["conditions"].items()})
        if "pixel_values" in batch:
            batch["pixel_values"] = to_device(batch["pixel_values"], encoder.device)
        if "latent_keys" in batch and encoder.latent_store is not None:
            batch["latent_moments"] = encoder.cached_moments(batch["latent_keys"])
        if "control_pixel_values" in batch:
            batch["control_pixel_values"] = [to_device(p, encoder.device) for p in batch["control_pixel_values"]]
        if "control_latent_keys" in batch and encoder.latent_store is not None:
            batch["control_means"] = encoder.cached_control_means(batch["control_latent_keys"])
        masks = encoder.masks(batch)
        if masks is not None:
            batch["masks"] = masks
        return batch

    upcoming = moved(next(batches))
    while True:
        current = upcoming
        try:
            upcoming = moved(next(batches))
        except StopIteration:
            yield current
            return
        yield current


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
