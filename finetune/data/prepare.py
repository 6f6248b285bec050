"""From the recipe's data section to what the loop trains on: the readable examples, each one's training size,
the batch groups (aspect-ratio buckets) and the policy for images smaller than their training size.

Images smaller than their training size (the resolution squared, or their bucket) are upscaled by default, as
other trainers do, with a warning naming them, since an enlarged image is softer than the rest and the model
learns that softness; `data.on_small_image: skip` leaves them out and `error` refuses to start.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from finetune.data.buckets import training_sizes
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


def prepare_data(d: DataOptions, global_batch: int, decode: bool = True) -> PreparedData:
    """`decode`: decode every image (training) or read headers only (`finetune validate`)."""
    examples = list_examples(d.images, d.dataset, prompt=d.prompt, caption_extension=d.caption_extension,
                             split=d.split, image_column=d.image_column, caption_column=d.caption_column,
                             on_bad_image=d.on_bad_image, decode=decode)
    attach_masks(examples, d.masks, d.images, decode)
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
        [d.repeats * e.repeats for e in examples])
    return PreparedData(examples, sizes, groups, report)


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
