"""What the loop computes once instead of every step, and where it keeps it: the caches and when they are on.

Two caches, both on by default where they give the same training as without them:
- latents: the VAE's latent distribution of every image variant. An entry is keyed by a digest of the exact
  pixels the VAE would see (so by the image's content, size, crop and flip) and of the VAE's weights and dtype;
  an image edited, a recipe resized, or another VAE never reuses an entry. Entries hold the distribution (mean
  and std), not one sample of it: each step still draws its own latent from the step's generator, exactly as an
  uncached step does, so caching changes speed and nothing else. With data.masks an entry also holds the
  variant's loss mask averaged to the latent's size, and its key covers the mask's pixels too. With data.control the
  control images' entries sit beside the targets', keyed the same way (`fill_controls`). `memory` keeps entries in
  RAM; `disk` keeps one small safetensors file per entry (written to a temporary name and renamed), shared by later
  runs; an entry found cut short or damaged (a copy of the cache, a sync client) is encoded again with a warning naming
  it, since it can always be rebuilt. Off when crops are random (each step would need a new crop).
- text: the text encoders' output per caption string (for SDXL both encodings and the pooled one), for the
  instance captions, the empty caption (caption dropout) and the class prompts. Off when the strategy trains a
  text encoder or rewrites captions.
A step reads them through finetune/training/inputs.py; anything missing is encoded live, so a cache can only save
time, never change a result.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from finetune.console import progress_bar
from finetune.data.control_sizes import control_pixels
from finetune.data.images import transform
from finetune.data.masks import latent_mask, transform_mask
from finetune.data.sources import Example
from finetune.file_errors import FileProblem, reading, writing
from finetune.io.atomic import atomic_file
from finetune.io.safetensors_io import load_tensors
from finetune.paths import cache_home, give_umask_permissions

log = logging.getLogger(__name__)

# below this the dataset's entries stay in memory under cache.latents: auto
AUTO_MEMORY_LIMIT_BYTES = 2 * 1024**3


def default_latent_dir() -> Path:
    return cache_home() / "latents"


def estimated_bytes(num_images: int, variants: int, resolution: int, latent_channels: int = 4,
                    downsample: int = 8) -> int:
    """Size of the entries (mean and std in fp32) for `num_images` x `variants` square images."""
    side = resolution // downsample
    return num_images * variants * 2 * latent_channels * side * side * 4


def vae_identity(vae: torch.nn.Module) -> str:
    """A digest of every weight and the dtype: two VAEs share cache entries only if they encode alike."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        # reshape(-1): a 0-d buffer (a BatchNorm's num_batches_tracked, Flux.2's VAE) has no byte view; same bytes
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


class LatentStore:
    """key -> (mean, std). `folder` None keeps entries in memory."""

    def __init__(self, folder: Path | None = None):
        self.folder = folder
        self.entries: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.mask_entries: dict[str, torch.Tensor] = {}  # in memory: key -> loss mask [1, h, w]
        # the keys whose entries hold a mask (`fill` notes those found on disk): a run without masks, and the
        # class images, never open an entry again to look for one
        self.masked_keys: set[str] = set()

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        """Whether a whole entry is there. A disk entry cut short or damaged is not: a warning names it, and
        `fill` encodes it again over it."""
        if self.folder is None:
            return key in self.entries
        path = self._path(key)
        if not path.is_file():
            return False
        try:  # opening checks the header against the file's size; no tensor data is read
            with reading(path, "latent cache entry", "encoding it again"), safe_open(str(path), framework="pt"):
                return True
        except FileProblem as exc:
            log.warning("%s", exc)
            return False

    def put(self, key: str, mean: torch.Tensor, std: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Keep an entry (with its loss mask, if any); FileProblem when the disk cache's folder cannot be written
        or is full."""
        tensors = {"mean": mean, "std": std} | ({"mask": mask} if mask is not None else {})
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
        if mask is not None:
            self.masked_keys.add(key)
        if self.folder is None:
            self.entries[key] = (tensors["mean"], tensors["std"])
            if mask is not None:
                self.mask_entries[key] = tensors["mask"]
            return
        path = self._path(key)
        # a present entry is always whole; not synced: an entry lost to a power cut is encoded again
        with writing(path, "a latent cache entry"), atomic_file(path, durable=False) as tmp:
            save_file(tensors, str(tmp))
            give_umask_permissions(tmp)  # a shared cache stays readable by the other users the umask allows

    def get(self, keys: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The entries for a batch, stacked. FileProblem for a disk entry damaged since `fill` looked at it."""
        if self.folder is None:
            pairs = [self.entries[key] for key in keys]
        else:
            fix = "delete it (the next run encodes it again)"
            pairs = [(tensors["mean"], tensors["std"]) for tensors in
                     (load_tensors(self._path(k), "latent cache entry", fix) for k in keys)]
        return torch.stack([m for m, _ in pairs]), torch.stack([s for _, s in pairs])

    def masks(self, keys: list[str]) -> torch.Tensor | None:
        """The batch's loss masks [batch, 1, h, w], stacked; None when its entries hold none (data.masks off)."""
        if keys[0] not in self.masked_keys:
            return None
        if self.folder is None:
            return torch.stack([self.mask_entries[key] for key in keys])
        masks = []
        for key in keys:  # only the mask's bytes are read
            with reading(self._path(key), "latent cache entry", "delete it (the next run encodes it again)"), \
                    safe_open(str(self._path(key)), framework="pt") as entry:
                masks.append(entry.get_tensor("mask"))
        return torch.stack(masks)


def pixel_key(pixels: torch.Tensor, vae_id: str, mask: torch.Tensor | None = None) -> str:
    """The entry's key: the pixels' digest (and the loss mask's, with data.masks; without, the keys are what
    they have always been, so existing caches stay valid)."""
    digest = hashlib.sha256(vae_id.encode())
    digest.update(str(tuple(pixels.shape)).encode())
    digest.update(pixels.numpy().tobytes())
    if mask is not None:
        digest.update(b"mask")
        digest.update(mask.numpy().tobytes())
    return digest.hexdigest()[:40]


def fill(store: LatentStore, examples: list[Example], sizes: list[tuple[int, int]], flips: bool, vae_id: str,
         encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], what: str,
         show_progress: bool = True) -> tuple[dict[tuple[int, bool], str], int]:
    """Make sure every (example, flip) variant has an entry; return the key of each, and how many were encoded
    now (the rest were there).

    `sizes[i]` is example i's (width, height) after resizing and center-cropping; `encode` maps a batch of one
    image to the VAE's (mean, std)."""
    keys: dict[tuple[int, bool], str] = {}
    encoded = 0
    variants = (False, True) if flips else (False,)
    for index in progress_bar(iterable=range(len(examples)), desc=f"caching latents ({what})", unit="image",
                              disable=not show_progress):
        image = examples[index].load()
        mask_image = examples[index].mask() if examples[index].mask is not None else None
        for flip in variants:
            pixels = transform(image, sizes[index], "center", flip)
            # the mask of this very variant (a flipped image gets the flipped mask), under the same key
            mask = transform_mask(mask_image, sizes[index], "center", flip) if mask_image is not None else None
            key = pixel_key(pixels, vae_id, mask)
            if key not in store:
                with torch.no_grad():
                    mean, std = encode(pixels[None])
                store.put(key, mean[0], std[0], None if mask is None else latent_mask(mask, mean.shape[-2:]))
                encoded += 1
            elif mask is not None:
                store.masked_keys.add(key)  # on disk from an earlier run, its mask with it (the key covers it)
            keys[(index, flip)] = key
    return keys, encoded


def fill_controls(store: LatentStore, examples: list[Example], sizes: list[tuple[int, int]],
                  control_sizes: list[tuple[tuple[int, int], ...]], resize: str, flips: bool, vae_id: str,
                  encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                  show_progress: bool = True) -> tuple[dict[tuple[int, bool], list[str]], int]:
    """`fill` for the examples' control images (data.control): every (example, flip) variant's control images
    encoded, keyed as the targets' entries are (the pixels the VAE sees, so per image, size and flip); returns each
    variant's keys, one per slot, and how many were encoded now. The pixels are those an uncached step encodes
    (data/control_sizes.py: control_pixels, centred as cached targets are)."""
    keys: dict[tuple[int, bool], list[str]] = {}
    encoded = 0
    for index in progress_bar(iterable=range(len(examples)), desc="caching latents (control images)", unit="image",
                              disable=not show_progress):
        for flip in (False, True) if flips else (False,):
            keys[(index, flip)] = []
            for pixels in control_pixels(examples[index], sizes[index], control_sizes[index], resize, "center", flip):
                key = pixel_key(pixels, vae_id)
                if key not in store:
                    with torch.no_grad():
                        mean, std = encode(pixels[None])
                    store.put(key, mean[0], std[0])
                    encoded += 1
                keys[(index, flip)].append(key)
    return keys, encoded


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
        stacked = torch.stack(rows)
        if torch.device(device).type == "cuda":
            # from page-locked memory the copy is queued without waiting for the GPU's work before it
            return stacked.pin_memory().to(device, non_blocking=True)
        return stacked.to(device)
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
