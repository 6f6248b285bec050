"""Decode and transform one training image: EXIF rotation, RGB, resize, crop, flip, to a [-1, 1] tensor."""
from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image, ImageOps


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright RGB: honour EXIF orientation, flatten transparency onto white, widen 16-bit and palettes."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def open_image(path: str) -> Image.Image:
    """Decode fully (so a truncated file fails here, not mid-training) and return upright RGB."""
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)


# EXIF orientations that turn the picture a quarter: width and height trade places once it is upright
_QUARTER_TURNS = {5, 6, 7, 8}


def probe_size(path: str) -> tuple[int, int]:
    """The upright (width, height) from the file's header alone, without decoding a pixel (what `finetune
    validate` checks by default). Raises what PIL raises for a file that is no image."""
    with Image.open(path) as image:
        width, height = image.size
        # the EXIF block read at open (JPEG, WebP, PNG's eXIf before the pixels); getexif() would decode a PNG
        exif = Image.Exif()
        if image.info.get("exif"):
            exif.load(image.info["exif"])
        orientation = exif.get(0x0112) or getattr(image, "tag_v2", {}).get(0x0112)  # TIFF keeps it as a tag
    return (height, width) if orientation in _QUARTER_TURNS else (width, height)


def cover_size(width: int, height: int, target: tuple[int, int]) -> tuple[int, int]:
    """The smallest size with the image's aspect ratio that covers `target` (width, height)."""
    scale = max(target[0] / width, target[1] / height)
    return max(target[0], round(width * scale)), max(target[1], round(height * scale))


def placement(size: tuple[int, int], target: tuple[int, int], crop: str,
              rng: random.Random | None = None) -> tuple[tuple[int, int], int, int]:
    """Where an image of `size` (width, height) lands: resized to cover `target` (width, height), then the crop's
    top-left corner in it, centred or where `rng` says. Returns ((width, height) after resizing, left, top)."""
    width, height = cover_size(*size, target)
    if crop == "random":
        return (width, height), rng.randint(0, width - target[0]), rng.randint(0, height - target[1])
    return (width, height), (width - target[0]) // 2, (height - target[1]) // 2


def size_conditions(size: tuple[int, int], target: tuple[int, int], crop: str, flip: bool,
                    rng: random.Random | None = None) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """SDXL's micro-conditioning for one image: (original (height, width), crop top-left (top, left), target
    (height, width)), the target being the bucket's size with buckets. The corner is where the crop really begins
    in the resized image, as Stability's SGM data pipeline and diffusers' SDXL scripts record it; after a mirror
    it is measured from the other side (`left = resized width - crop right`), as kohya mirrors it. (kohya's
    get_crop_ltrb reports instead the margin a fit-inside resize would leave, which does not describe a crop.)
    Draws from `rng` exactly as `transform` does, so call one or the other with a given generator."""
    resized, left, top = placement(size, target, crop, rng)
    if flip:
        left = resized[0] - (left + target[0])
    return (size[1], size[0]), (top, left), (target[1], target[0])


def placed(image: Image.Image, target: tuple[int, int], crop: str, flip: bool,
           rng: random.Random | None = None) -> Image.Image:
    """Resize to cover `target` (width, height), crop it (centred, or where `rng` says), maybe mirror; any mode
    (a mask, data/masks.py, goes through the same resampling and crop as its image)."""
    size, left, top = placement(image.size, target, crop, rng)
    if size != image.size:
        upscale = size[0] > image.size[0]
        image = image.resize(size, Image.Resampling.BICUBIC if upscale else Image.Resampling.LANCZOS)
    image = image.crop((left, top, left + target[0], top + target[1]))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def transform(image: Image.Image, target: tuple[int, int], crop: str, flip: bool,
              rng: random.Random | None = None) -> torch.Tensor:
    """`placed`, as CHW float in [-1, 1]."""
    image = placed(image, target, crop, flip, rng)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
