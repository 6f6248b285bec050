"""What a run says before it trains (its plan) and after (every file it wrote, and what reads each)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

# folders a run fills with many files: listed as one line each, with what they hold
RUN_FOLDERS = {
    "checkpoints": "checkpoints, for `--resume latest`",
    "samples": "sample grids (PNG)",
    "snapshots": "loadable copies of the artifact made during training",
    "logs": "TensorBoard events / W&B run files",
    "eval": "evaluation figures (JSON, one file per `finetune eval` or demo judgement); read by `finetune report`",
}
# files every run writes for its report page
RUN_FILES = {
    "history.jsonl": "training history, one JSON line per step (loss, lr, throughput, memory); read by "
                     "`finetune report` and any JSON-lines reader",
    "run.json": "the run's notes for its report (recipe, plan, data, sample labels, state); read by `finetune report`",
    "report.html": "the run's report page (curves, sample grids, data, files); read by a web browser, "
                   "rebuilt by `finetune report`",
    "buckets.json": "aspect-ratio bucket report (JSON); read by `finetune report` and any JSON reader",
}


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


def written_entries(output_dir: Path, since: float) -> list[tuple[Path, str]]:
    """(absolute path, what it is and what reads it) for what written_lines lists; since=0: everything."""
    from finetune.export.describe import describe

    output_dir = output_dir.resolve()
    entries = []
    for path in sorted(output_dir.rglob("*")):
        relative = path.relative_to(output_dir).parts
        if path.name.startswith(".") or (relative[0] in RUN_FOLDERS and len(relative) > 1):
            continue  # hidden, or inside a run folder (listed once, as a whole)
        if not _written_since(path, since):
            continue
        if relative[0] in RUN_FOLDERS:
            entries.append((path, RUN_FOLDERS[relative[0]]))
            continue
        if path.is_dir() and not (path / "model_index.json").is_file():
            continue  # a plain folder (kohya/, a1111/): its files are listed
        if any((output_dir.joinpath(*relative[:i]) / "model_index.json").is_file() for i in range(1, len(relative))):
            continue  # inside a pipeline folder, which was listed whole
        entries.append((path, RUN_FILES.get(path.name) if len(relative) == 1 and path.name in RUN_FILES
                        else _what(path, describe)))
    return entries


def _written_since(path: Path, since: float) -> bool:
    if path.is_file():
        return path.stat().st_mtime >= since
    return any(p.is_file() and p.stat().st_mtime >= since for p in path.rglob("*"))


def _what(path: Path, describe) -> str:
    if path.suffix not in (".safetensors", ".pt") and not path.is_dir():
        return {".json": "JSON", ".png": "image"}.get(path.suffix, "file")
    try:
        info = describe(path)
    except (OSError, ValueError) as exc:
        return f"unreadable ({exc})"
    return f"{info['kind']}; read by {info['read_by']}" if info.get("read_by") else info["kind"]
