"""What the loop computes once instead of every step, and the one place a step turns a batch into model inputs.

Two caches, both on by default where they give the same training as without them:
- latents (finetune/data/latent_cache.py): the VAE's latent distribution of every image variant. Off when crops
  are random (each step would need a new crop).
- text: the text encoder's output per caption string, for the instance captions, the empty caption (caption
  dropout) and the class prompts. Off when the strategy trains the text encoder or rewrites captions.
A step then reads the caches (`BatchEncoder`); anything missing is encoded live, so a cache can only save
time, never change a result.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from finetune.data.latent_cache import (AUTO_MEMORY_LIMIT_BYTES, LatentStore, default_latent_dir, fill,
                                        vae_identity)
from finetune.data.sources import Example
from finetune.models.base import Components, ModelFamily

log = logging.getLogger(__name__)


@dataclass
class CachePlan:
    latents: str  # "memory", "disk" or "off"
    text: bool
    notes: list[str] = field(default_factory=list)  # why a cache asked for with "auto" is off


def latent_cache_conflict(crop: str) -> str | None:
    if crop == "random":
        return ("data.crop is random, so every step needs a new crop of the image and one cached encoding "
                "per image would train on the same crop forever")
    return None


def plan_caches(latents: str, text: str, crop: str, text_change: str | None, estimated_bytes: int) -> CachePlan:
    """Resolve "auto"; explicit settings that cannot be right were refused by `finetune validate` already."""
    plan = CachePlan(latents="off", text=False)
    conflict = latent_cache_conflict(crop)
    if latents == "auto":
        if conflict:
            plan.notes.append(f"latent cache off: {conflict}; set data.crop: center to cache latents")
        else:
            plan.latents = "memory" if estimated_bytes <= AUTO_MEMORY_LIMIT_BYTES else "disk"
    elif latents != "off" and not conflict:
        plan.latents = latents
    if text == "auto" and text_change:
        plan.notes.append(f"text cache off: {text_change}")
    plan.text = text == "on" or (text == "auto" and text_change is None)
    return plan


def _rows(conditioning: Any) -> list[Any]:
    """Split a batch's conditioning (a tensor, or a tuple of tensors for families with pooled outputs) per caption."""
    if isinstance(conditioning, torch.Tensor):
        return [row.detach().cpu().clone() for row in conditioning]
    return list(zip(*[_rows(part) for part in conditioning]))


def _stack(rows: list[Any], device: torch.device) -> Any:
    if isinstance(rows[0], torch.Tensor):
        return torch.stack(rows).to(device)
    return tuple(_stack(list(parts), device) for parts in zip(*rows))


class TextCache:
    """caption -> the frozen text encoder's output for it, kept on the CPU (a caption is encoded once)."""

    def __init__(self, encode: Callable[[list[str]], Any], batch_size: int = 16):
        self.encode = encode
        self.batch_size = batch_size
        self.entries: dict[str, Any] = {}

    def fill(self, captions: list[str]) -> int:
        """Encode the captions not cached yet; return how many that was."""
        missing = list(dict.fromkeys(c for c in captions if c not in self.entries))
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start:start + self.batch_size]
            with torch.no_grad():
                self.entries.update(zip(chunk, _rows(self.encode(chunk))))
        return len(missing)

    def get(self, captions: list[str], device: torch.device) -> Any:
        self.fill(captions)  # a caption no one foresaw is encoded now, not refused
        return _stack([self.entries[c] for c in captions], device)


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
        store = LatentStore(Path(os.path.expanduser(latent_dir)) if latent_dir else default_latent_dir())
    text = TextCache(partial(family.encode_prompts, parts)) if plan.text else None
    return BatchEncoder(family, parts, device, store, text, show_progress)
