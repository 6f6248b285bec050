"""Masked loss: a grayscale mask per training image (white: trained, black: not) weights the per-pixel loss.

`data.masks: alpha` takes each image's alpha channel; `data.masks: FOLDER` one mask image per training image,
found by the image's path relative to data.images with any image suffix (`sub/cat.jpg` -> `FOLDER/sub/cat.png`),
else by its file name's stem at the folder's top (`FOLDER/cat.png`, kohya's flat layout). A mask must have its
image's size; it follows the image through resizing, buckets, crops and flips (`transform_mask` places it as
data/images.py places the image) and into the latent cache (finetune/data/caches.py keeps it, averaged to the
latent's size, beside the latent of the same variant).

In the loss (training/step.py) the mask is averaged over each latent cell (`latent_weights`, an area average:
a cell half covered weighs half), blended with `data.unmasked_weight` (weight = u + (1 - u) x mask), and the
weighted squared error is averaged over all cells, as kohya's apply_masked_loss and OneTrainer's default do: an
all-white mask trains as no mask does, and an image whose mask covers a quarter of it gives a quarter of the
loss, so each trained pixel counts the same in every image and learning rates carry over between trainers.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps

from finetune.data.images import placed, probe_size, to_rgb
from finetune.data.sources import IMAGE_SUFFIXES, DataError, Example, some

ALPHA = "alpha"
# PIL modes that carry an alpha channel (a palette or grey image may also name a transparent colour in its info)
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


class MaskProblem(ValueError):
    """One image's mask cannot serve; the text names the file and what is wrong."""


def attach_masks(examples: list[Example], masks: str | None, images_folder: str | None, decode: bool) -> None:
    """Give each example its mask (`Example.mask`), proven usable: present, readable, of its image's size, and
    for `alpha`, an image with an alpha channel. `decode`: decode each mask whole (training) or read its header
    (`finetune validate`). Raises DataError naming every image whose mask cannot serve."""
    if masks is None:
        return
    problems = []
    index = None if masks == ALPHA else image_index(Path(os.path.expanduser(masks)))
    root = Path(os.path.expanduser(images_folder)) if images_folder else None
    for example in examples:
        try:
            if index is None:
                example.mask = _alpha_mask(example, decode)
            else:
                example.mask = _folder_mask(example, _find_mask(Path(example.name), root, index, masks), decode)
        except MaskProblem as exc:
            problems.append(str(exc))
    if problems:
        fix = ("save the images with their transparency (PNG or WebP with alpha), or give data.masks a folder "
               "of mask images" if masks == ALPHA else
               f"give every image a grayscale mask of its size in {masks}, named as the image (any image suffix)")
        raise DataError(f"data.masks: {len(problems)} image(s) have no usable mask: "
                        f"{some(problems, separator='; ')}. Fix: {fix}")


def image_index(folder: Path) -> dict[str, list[Path]]:
    """Every image file under `folder` by its path relative to it, without suffix ("sub/cat")."""
    found: dict[str, list[Path]] = {}
    for directory, subfolders, files in os.walk(folder):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        for name in sorted(files):
            path = Path(directory) / name
            if path.suffix.lower() in IMAGE_SUFFIXES:
                found.setdefault(path.relative_to(folder).with_suffix("").as_posix(), []).append(path)
    return found


def _find_mask(image: Path, images_root: Path | None, index: dict[str, list[Path]], folder: str) -> Path:
    relative = image.relative_to(images_root).with_suffix("") if images_root else Path(image.stem)
    for key in dict.fromkeys((relative.as_posix(), relative.name)):
        candidates = index.get(key, [])
        if len(candidates) > 1:
            raise MaskProblem(f"{image}: several masks match it ({', '.join(p.name for p in candidates)}); "
                              "keep one")
        if candidates:
            return candidates[0]
    raise MaskProblem(f"{image}: no mask {relative.as_posix()}.* in {folder}")


def _folder_mask(example: Example, path: Path, decode: bool) -> Callable[[], Image.Image]:
    try:
        size = read_mask(path).size if decode else probe_size(str(path))
    except Exception as exc:  # PIL raises many types for broken files
        raise MaskProblem(f"{path} (mask of {example.name}) cannot be read ({type(exc).__name__}: {exc})") from None
    if size != example.size:
        raise MaskProblem(f"{path} is {size[0]}x{size[1]}, its image {example.name} is "
                          f"{example.size[0]}x{example.size[1]}")
    return lambda: read_mask(path)


def read_mask(path: Path) -> Image.Image:
    """A mask file as upright 8-bit grayscale ("L"): EXIF orientation honoured, colour by its luminance, 16-bit
    widened (data/images.py: to_rgb)."""
    with Image.open(path) as image:
        image.load()
        return to_rgb(image).convert("L")


def _alpha_mask(example: Example, decode: bool) -> Callable[[], Image.Image]:
    path = example.name
    try:
        with Image.open(path) as image:
            has_alpha = image.mode in _ALPHA_MODES or "transparency" in image.info
            if decode:
                image.load()
    except Exception as exc:
        raise MaskProblem(f"{path} cannot be read ({type(exc).__name__}: {exc})") from None
    if not has_alpha:
        raise MaskProblem(f"{path} has no alpha channel (mode {image.mode})")
    return lambda: read_alpha(path)


def read_alpha(path: str) -> Image.Image:
    """The image's alpha channel, upright, as "L" (opaque: white, trained)."""
    with Image.open(path) as image:
        image.load()
        return ImageOps.exif_transpose(image).convert("RGBA").getchannel("A")


def transform_mask(mask: Image.Image, target: tuple[int, int], crop: str, flip: bool, rng=None) -> torch.Tensor:
    """The mask placed as its image is (same resize, crop and mirror; draws from `rng` as data/images.py's
    transform does), as [1, height, width] float in [0, 1]."""
    array = np.asarray(placed(mask, target, crop, flip, rng), dtype=np.float32) / 255.0
    return torch.from_numpy(array)[None].contiguous()


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Masks [..., H, W] averaged over each cell of a `size` (h, w) grid (an area average: exact when H/h and W/w
    are whole, as the VAE's downsampling makes them)."""
    return torch.nn.functional.adaptive_avg_pool2d(mask.float(), tuple(size))


def latent_weights(masks: torch.Tensor, size: tuple[int, int], unmasked_weight: float) -> torch.Tensor:
    """Per-cell loss weights [B, 1, h, w] for masks [B, 1, H, W] (pixels, or already the latent's size, from the
    cache): the mask's area average per latent cell, where 1 keeps the full loss and 0 `unmasked_weight` of it."""
    cells = latent_mask(masks, size)
    return unmasked_weight + (1.0 - unmasked_weight) * cells


def summary_line(masks: str | None, unmasked_weight: float) -> str | None:
    """The run summary's line for the masked loss (None: masks off)."""
    if masks is None:
        return None
    source = "each image's alpha channel" if masks == ALPHA else f"the masks in {masks}"
    return (f"masked loss: weighted by {source} (black weighs {unmasked_weight:g}, white 1; "
            "prior-preservation images unmasked)")
