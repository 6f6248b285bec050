"""What a run says before it trains (its plan) and after (every file it wrote, and what reads each)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune.report.sources import written_entries


@dataclass
class Plan:
    images_per_folder: dict[str, tuple[int, int]]  # folder -> (images, repeats of each)
    max_steps: int
    batch_size: int  # per process
    processes: int
    accumulation: int
    batches_per_epoch: int  # micro-batches each process takes per epoch
    trainable: dict[str, torch.Tensor]  # the strategy's state: what trains (textual inversion: its new rows)
    device: str
    precision: str  # mixed precision and the frozen base's dtype
    base: str  # the base model: an absolute path, or a hub id
    output_dir: Path


def images_per_folder(examples: list, repeats: int) -> dict[str, tuple[int, int]]:
    """{folder: (images, samples per epoch of each)} by the folder the images sit in (absolute paths); dataset
    rows (`name[row]`) by dataset. `repeats`: data.repeats, times each folder's own (kohya's `10_name`)."""
    counts: Counter = Counter()
    each: dict[str, int] = {}
    for example in examples:
        name = example.name
        folder = name.rsplit("[", 1)[0] if name.endswith("]") else str(Path(name).resolve().parent)
        counts[folder] += 1
        each[folder] = repeats * example.repeats  # one folder, one kohya name: the same for all its images
    return {folder: (counts[folder], each[folder]) for folder in sorted(counts)}


def data_lines(folders: dict[str, tuple[int, int]]) -> list[str]:
    """The data part of the summary (training and `finetune validate` print it alike)."""
    images = sum(n for n, _ in folders.values())
    samples = sum(n * r for n, r in folders.values())
    return [f"data: {images} image(s), {samples} samples per epoch with their repeats",
            *(f"  {folder}: {n} image(s) x {r} repeat(s)" for folder, (n, r) in folders.items())]


def length_line(max_steps: int, batch_size: int, processes: int, accumulation: int, batches_per_epoch: int) -> str:
    effective = batch_size * processes * accumulation
    epochs = max_steps * accumulation / batches_per_epoch
    return (f"steps: {max_steps} ({epochs:.3g} epoch(s)); effective batch {effective} = {batch_size} per process x "
            f"{processes} process(es) x {accumulation} accumulation")


def plan_lines(plan: Plan) -> list[str]:
    """The summary printed before the first step: data, length, batch, what trains, where, and where files go."""
    count = sum(t.numel() for t in plan.trainable.values())
    size = sum(t.numel() * t.element_size() for t in plan.trainable.values())
    shown = f"{size / 2**20:.1f} MB" if size >= 2**20 else f"{size / 2**10:.1f} KB"
    return [*data_lines(plan.images_per_folder),
            length_line(plan.max_steps, plan.batch_size, plan.processes, plan.accumulation, plan.batches_per_epoch),
            f"trains: {count:,} parameters ({shown}); on {plan.device}, {plan.precision}",
            f"base: {plan.base}",
            f"output: {plan.output_dir.resolve()}"]


def written_lines(output_dir: Path, since: float) -> list[str]:
    """Every file or folder in output_dir written at or after `since` (time.time()), with absolute paths and what
    each is, and which loader or program reads it (as `finetune inspect` says)."""
    return [f"  {path}{'/' if path.is_dir() else ''}: {what}" for path, what in written_entries(output_dir, since)]

