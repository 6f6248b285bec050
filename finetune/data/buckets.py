"""Aspect-ratio bucketing: each image trains at the bucket size closest to its own shape, so a portrait is
not cut to a square; every batch comes from one bucket, so its images stack.

Buckets are given (`data.buckets`) or derived: every width from `bucket_min_side` to `bucket_max_side` in
steps of `bucket_step`, with the tallest height in the same steps that keeps width x height within
`data.resolution` squared. Unset, the grid follows the resolution (`default_grid`): kohya's 64 / 256 / 1024 at
512 px, scaled down for smaller resolutions so that buckets always exist. An image goes to the bucket whose aspect ratio is nearest its own (in log scale) and
is resized to cover it and center-cropped. Skipped, with the reason in the report: an image a crop would cut by
more than `bucket_max_crop` of its area, and the images of a bucket holding fewer than one batch.

With control images (data.control, finetune/data/control.py) sized by `resize: bucket`, a batch shares every
control slot's size as well as the target's: the groups are keyed by (target bucket, control sizes), since edit
transformers read the position ids of the whole batch from its first sample. Sizes are (width, height) throughout.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from finetune.io.atomic import write_text_atomically

Size = tuple[int, int]  # (width, height)
Controls = tuple[Size, ...]  # one (width, height) per control slot


def default_grid(resolution: int, step: int | None, min_side: int | None,
                 max_side: int | None) -> tuple[int, int, int]:
    """(step, min_side, max_side) with every unset value following `resolution` (pixels): sides from half to
    twice the resolution, in steps of 64 from 512 px up (kohya's defaults at 512: 64, 256, 1024) and of an eighth
    of the resolution (a multiple of 8) below."""
    step = step or (64 if resolution >= 512 else max(8, resolution // 8 // 8 * 8))
    min_side = min_side or max(step, resolution // 2 // step * step)
    max_side = max_side or max(resolution * 2, min_side)
    return step, min_side, max_side


def derive_buckets(max_area: int, step: int, min_side: int, max_side: int) -> list[Size]:
    buckets = set()
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, (max_area // width) // step * step)
        if height >= min_side:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets)


def crop_share(image: Size, bucket: Size) -> float:
    """Share of the image's area a cover-resize then crop to `bucket` cuts away."""
    image_ratio, bucket_ratio = image[0] / image[1], bucket[0] / bucket[1]
    return 1.0 - min(image_ratio, bucket_ratio) / max(image_ratio, bucket_ratio)


def nearest_bucket(image: Size, buckets: list[Size]) -> Size:
    ratio = math.log(image[0] / image[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


@dataclass
class BucketPlan:
    sizes: dict[int, Size] = field(default_factory=dict)  # example index -> training size
    # bucket -> example indices that train; with grouping controls, (bucket, control sizes) -> indices
    groups: dict = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (image, why)
    with_controls: bool = False  # whether the groups are keyed by (bucket, control sizes)

    def report(self, global_batch: int, repeats: list[int]) -> dict:
        rows = []
        for key, indices in sorted(self.groups.items()):
            (w, h), controls = key if self.with_controls else (key, None)
            row = {"width": w, "height": h, "images": len(indices),
                   "batches_per_epoch": sum(repeats[i] for i in indices) // global_batch}
            rows.append(row if controls is None else row | {"controls": [list(size) for size in controls]})
        return {"buckets": rows, "skipped": [{"image": name, "reason": why} for name, why in self.skipped]}


def plan_buckets(names: list[str], image_sizes: list[Size], buckets: list[Size], max_crop: float,
                 global_batch: int, repeats: list[int], controls: list[Controls] | None = None) -> BucketPlan:
    """`repeats`: each image's samples per epoch (data.repeats times its folder's). `controls`: each image's
    control sizes, when they differ from its bucket (data.control's `resize: bucket`): a group then holds the
    images that share their bucket and every control size."""
    plan = BucketPlan(with_controls=controls is not None)
    for index, (name, size) in enumerate(zip(names, image_sizes)):
        bucket = nearest_bucket(size, buckets)
        cut = crop_share(size, bucket)
        if cut > max_crop:
            plan.skipped.append((name, f"{size[0]}x{size[1]}: the nearest bucket {bucket[0]}x{bucket[1]} would "
                                       f"crop away {cut:.0%} of it (data.bucket_max_crop {max_crop:.0%})"))
            continue
        plan.groups.setdefault(bucket if controls is None else (bucket, controls[index]), []).append(index)
    for key, indices in list(plan.groups.items()):
        samples = sum(repeats[i] for i in indices)
        if samples < global_batch:
            for index in indices:
                plan.skipped.append((names[index], f"{_group_name(key, plan.with_controls)} holds {len(indices)} "
                                                   f"image(s), {samples} sample(s) with repeats, fewer than one "
                                                   f"batch ({global_batch})"))
            del plan.groups[key]
    plan.sizes = {i: key[0] if plan.with_controls else key for key, indices in plan.groups.items() for i in indices}
    return plan


def _group_name(key, with_controls: bool) -> str:
    bucket, controls = key if with_controls else (key, ())
    shown = f"bucket {bucket[0]}x{bucket[1]}"
    return shown + (f" with control(s) {', '.join(f'{w}x{h}' for w, h in controls)}" if controls else "")


def format_report(report: dict) -> str:
    controls = any("controls" in b for b in report["buckets"])
    lines = ["bucket       images  batches/epoch" + ("  controls" if controls else "")]
    lines += [f"{b['width']:>4}x{b['height']:<6} {b['images']:>7}  {b['batches_per_epoch']:>13}"
              + ("  " + ", ".join(f"{w}x{h}" for w, h in b["controls"]) if "controls" in b else "")
              for b in report["buckets"]]
    if report["skipped"]:
        lines.append(f"skipped {len(report['skipped'])} image(s):")
        lines += [f"  {s['image']}: {s['reason']}" for s in report["skipped"]]
    return "\n".join(lines)


def write_report(report: dict, path: Path) -> None:
    write_text_atomically(path, json.dumps(report, indent=2))


def training_sizes(names: list[str], image_sizes: list[Size], resolution: int, bucketing: bool,
                   buckets: list[list[int]], step: int | None, min_side: int | None, max_side: int | None,
                   max_crop: float, global_batch: int, repeats: list[int],
                   controls: list[Controls] | None = None) -> tuple[list[Size], list[list[int]] | None, dict | None]:
    """Each example's training size, the batch groups (None: one group of all) and the bucket report. `controls`:
    each example's control sizes where they do not follow its own (plan_buckets): without buckets, the square
    images are then grouped by their control sizes alone (and the report says how)."""
    square = [(resolution, resolution)] * len(names)
    if not bucketing and len(set(controls or [()])) <= 1:
        return square, None, None
    if not bucketing:  # one square "bucket", cropped as without buckets (center crop, whatever its share)
        sizes, max_crop = [(resolution, resolution)], 1.0
    else:
        sizes = [tuple(b) for b in buckets] or derive_buckets(resolution * resolution,
                                                              *default_grid(resolution, step, min_side, max_side))
    plan = plan_buckets(names, image_sizes, sizes, max_crop, global_batch, repeats, controls)
    trained = [plan.sizes.get(i, square[i]) for i in range(len(names))]  # skipped ones are never drawn
    return trained, list(plan.groups.values()), plan.report(global_batch, repeats)
