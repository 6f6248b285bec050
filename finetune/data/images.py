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


def transform(image: Image.Image, resolution: int, crop: str, flip: bool, rng: random.Random) -> torch.Tensor:
    """Resize the shorter side to `resolution`, crop a square, maybe flip; returns CHW float in [-1, 1]."""
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.LANCZOS)
    width, height = image.size
    if crop == "random":
        left, top = rng.randint(0, width - resolution), rng.randint(0, height - resolution)
    else:
        left, top = (width - resolution) // 2, (height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
