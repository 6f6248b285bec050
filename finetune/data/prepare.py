"""From the recipe's data section to what the loop trains on: the readable examples, each one's training size,
the batch groups (aspect-ratio buckets) and the policy for images smaller than their training size.

Images smaller than their training size (the resolution squared, or their bucket) are upscaled by default, as
other trainers do, with a warning naming them, since an enlarged image is softer than the rest and the model
learns that softness; `data.on_small_image: skip` leaves them out and `error` refuses to start.
"""
from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field

from finetune.data.buckets import training_sizes
from finetune.data.control import attach_controls
from finetune.data.control_sizes import control_sizes, grouping_sizes
from finetune.data.masks import attach_masks
from finetune.data.sources import DataError, Example, list_examples, some
from finetune.recipe.schema import DataOptions

log = logging.getLogger(__name__)
Size = tuple[int, int]


@dataclass
class PreparedData:
    examples: list[Example]
    sizes: list[Size]  # (width, height) each example trains at
    groups: list[list[int]] | None  # example indices per bucket; None: one group of all
    bucket_report: dict | None
    held_out: list[Example] = field(default_factory=list)  # validation's images, never trained on
    # each example's control images' training sizes, (width, height) per slot (data/control_sizes.py); None
    # without data.control
    control_sizes: list[tuple[Size, ...]] | None = None


def prepare_data(d: DataOptions, global_batch: int, decode: bool = True, held_out_fraction: float | None = None,
                 held_out_seed: int = 0) -> PreparedData:
    """`decode`: decode every image (training) or read headers only (`finetune validate`). `held_out_fraction`:
    validation.images as a fraction, those images set apart (split_held_out) before anything else sees the data."""
    examples = list_examples(d.images, d.dataset, prompt=d.prompt, caption_extension=d.caption_extension,
                             split=d.split, image_column=d.image_column, caption_column=d.caption_column,
                             on_bad_image=d.on_bad_image, decode=decode)
    attach_masks(examples, d.masks, d.images, decode)
    attach_controls(examples, d.control, d.images, d.dataset, decode)
    held_out = []
    if held_out_fraction is not None:
        examples, held_out = split_held_out(examples, held_out_fraction, held_out_seed)
    prepared = _fitted(examples, d, global_batch)
    prepared.held_out = held_out
    return prepared


def held_out_fraction(images: str | None) -> float | None:
    """The fraction of the training images `validation.images` asks to hold out ("0.1" or 0.1), or None when it
    names a folder (or nothing)."""
    if images is None or isinstance(images, bool):
        return None
    try:
        value = float(images)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def split_held_out(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(trained, held out): floor(fraction x count) examples picked with `seed` (validation.seed), in their
    order. Raises DataError when that holds out none, or leaves none to train on."""
    count = math.floor(fraction * len(examples) + 1e-9)  # 0.1 x 30 is 3, not 2.9999
    if len(examples) < 2:
        raise DataError(f"validation.images: holding out a fraction needs at least 2 training images (one held "
                        f"out, one trained on), and there are {len(examples)}; give a folder of held-out images "
                        "(validation.images: FOLDER)")
    if count < 1:
        raise DataError(
            f"validation.images: {fraction:g} of {len(examples)} image(s) holds out none (it needs at least "
            f"{math.ceil(1 / fraction) if fraction > 0 else 'more'} images); raise the fraction to at least "
            f"{1 / len(examples):.2g}, or give a folder of held-out images (validation.images: FOLDER)")
    if count >= len(examples):
        raise DataError(
            f"validation.images: {fraction:g} of {len(examples)} image(s) holds out {count}, leaving none to train "
            "on; lower the fraction (0.1 is usual) or give a folder of held-out images")
    picked = set(random.Random(seed).sample(range(len(examples)), count))
    return ([e for i, e in enumerate(examples) if i not in picked], [e for i, e in enumerate(examples) if i in picked])


def _fitted(examples: list[Example], d: DataOptions, global_batch: int) -> PreparedData:
    """The examples sized, and those smaller than their training size upscaled, skipped or refused."""
    prepared = _sized(examples, d, global_batch)
    small = _smaller_than_trained(prepared)
    if not small:
        return prepared
    shown = some([f"{prepared.examples[i].name} ({_wxh(prepared.examples[i].size)} for {_wxh(prepared.sizes[i])})"
                  for i in small], separator="; ")
    if d.on_small_image == "error":
        raise DataError(
            f"{len(small)} image(s) are smaller than the size they train at: {shown}. Use larger images, lower "
            "data.resolution, or set data.on_small_image: upscale (enlarge them; they come out softer) or skip")
    if d.on_small_image == "skip":
        log.warning("leaving out %d image(s) smaller than the size they train at (data.on_small_image: skip): %s",
                    len(small), shown)
        kept = [e for i, e in enumerate(prepared.examples) if i not in set(small)]
        if not kept:
            raise DataError("every image is smaller than the size it trains at, so data.on_small_image: skip "
                            "leaves none; lower data.resolution or set data.on_small_image: upscale")
        return _sized(kept, d, global_batch)
    log.warning("upscaling %d image(s) smaller than the size they train at; they come out softer than the rest "
                "(data.on_small_image: skip or error to avoid): %s", len(small), shown)
    return prepared


def trained_examples(prepared: PreparedData) -> list[Example]:
    """The examples that train: all, or those a bucket plan kept (the others are never drawn)."""
    if prepared.groups is None:
        return prepared.examples
    return [prepared.examples[i] for i in sorted(i for group in prepared.groups for i in group)]


def _sized(examples: list[Example], d: DataOptions, global_batch: int) -> PreparedData:
    sizes, groups, report = training_sizes(
        [e.name for e in examples], [e.size for e in examples], d.resolution, d.bucketing or bool(d.buckets),
        d.buckets, d.bucket_step, d.bucket_min_side, d.bucket_max_side, d.bucket_max_crop, global_batch,
        [d.repeats * e.repeats for e in examples], grouping_sizes(examples, d))
    return PreparedData(examples, sizes, groups, report, control_sizes=control_sizes(examples, sizes, d))


def _smaller_than_trained(prepared: PreparedData) -> list[int]:
    """Indices of the examples that would be enlarged to cover their training size (ones a bucket plan left
    out are never drawn and do not count)."""
    drawn = set(range(len(prepared.examples))) if prepared.groups is None else {
        i for group in prepared.groups for i in group}
    return [i for i in sorted(drawn)
            if max(prepared.sizes[i][0] / prepared.examples[i].size[0],
                   prepared.sizes[i][1] / prepared.examples[i].size[1]) > 1]


def _wxh(size: Size | None) -> str:
    return f"{size[0]}x{size[1]}" if size else "?"
