"""How control images (data.control, finetune/data/control.py) are sized and placed, for the dataset and the latent
cache alike, so that a cached control latent is the encoding of exactly the pixels an uncached step would encode.

- `resize: target`: a control image is brought to its target's training size (the resolution squared, or the
  target's bucket) by the target's own resize, crop and flip, so that an edit stays pixel-aligned with its target
  (the diffusers Kontext training script transforms both alike; ai-toolkit and musubi-tuner resize the control to
  the target's size by default).
- `resize: bucket`: a control image keeps its own aspect ratio: it goes to the bucket nearest its shape in a grid
  of `data.control.resolution` squared in area (data.buckets at data.resolution; otherwise the derived grid of
  data/buckets.py), center-cropped, and mirrored when its target is. This is how the Kontext and Qwen-Image-Edit
  pipelines size a reference (about a fixed area, its own aspect ratio); the batch groups then share every
  control slot's size too (data/buckets.py).
Sizes are (width, height), as everywhere in finetune/data; tensors are [3, height, width].
"""
from __future__ import annotations

import random
from typing import Any

import torch

from finetune.data.buckets import Controls, Size, default_grid, derive_buckets, nearest_bucket
from finetune.data.images import transform
from finetune.data.sources import Example


def control_buckets(d: Any) -> list[Size]:
    """The grid `resize: bucket` places control images in, for data section `d`: data.buckets when the control
    resolution is data.resolution, else every bucket of the derived grid at data.control.resolution squared
    (data.bucket_step kept; the sides follow that resolution)."""
    resolution = d.control.resolution or d.resolution
    if resolution == d.resolution:
        if d.buckets:
            return [tuple(bucket) for bucket in d.buckets]
        return derive_buckets(resolution * resolution,
                              *default_grid(resolution, d.bucket_step, d.bucket_min_side, d.bucket_max_side))
    return derive_buckets(resolution * resolution, *default_grid(resolution, d.bucket_step, None, None))


def grouping_sizes(examples: list[Example], d: Any) -> list[Controls] | None:
    """Each example's control sizes where they do not follow its target (`resize: bucket`), for data/buckets.py to
    group batches by; None otherwise (no data.control, or `resize: target`, whose controls share their target's
    size and so its bucket)."""
    if d.control is None or d.control.resize != "bucket":
        return None
    buckets = control_buckets(d)
    return [tuple(nearest_bucket(c.size, buckets) for c in e.controls) for e in examples]


def control_sizes(examples: list[Example], sizes: list[Size], d: Any) -> list[Controls] | None:
    """Each example's control training sizes, one (width, height) per slot, given the targets' `sizes`; None
    without data.control."""
    if d.control is None:
        return None
    return grouping_sizes(examples, d) or [(size,) * len(e.controls) for e, size in zip(examples, sizes)]


def control_pixels(example: Example, target: Size, sizes: Controls, resize: str, crop: str, flip: bool,
                   rng: random.Random | None = None) -> list[torch.Tensor]:
    """The example's control images as they train, each [3, height, width] in [-1, 1]: with `resize: target`,
    placed exactly as its target (`target` size, `crop`, the corner drawn from `rng` as the target's was: pass the
    generator in the state the target's transform started from); with `bucket`, centred in its own size. Mirrored
    when `flip`. `rng` is left in the state it came in."""
    state = rng.getstate() if rng is not None else None
    pixels = []
    for control, size in zip(example.controls or [], sizes):
        if resize == "target":
            pixels.append(transform(control.load(), target, crop, flip, rng))
            if rng is not None:
                rng.setstate(state)
        else:
            pixels.append(transform(control.load(), size, "center", flip))
    return pixels
