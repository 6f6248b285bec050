"""What a run folder holds, read for its report page: the recipe (wherever the run kept it), sample grids,
evaluation figures and the run's files. Nothing here needs the run to be alive, or to be new."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from finetune.report.history import HISTORY, RUN_INFO

EVAL_DIR = "eval"  # output_dir/eval/<label>.json: figures of `finetune eval` and the demo
SAMPLE_NAME = re.compile(r"^step-(\d+)\.png$")
# what marks a folder as a run's output_dir (besides an artifact)
MARKERS = (HISTORY, RUN_INFO, "checkpoints", "samples", "report.html")
ARTIFACTS = ("pytorch_lora_weights.safetensors", "learned_embeds.safetensors", "hypernetwork.safetensors",
             "pipeline")
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


class NotARunFolder(ValueError):
    pass


def is_run_folder(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in MARKERS + ARTIFACTS)


def check_run_folder(path: Path) -> Path:
    """`path` itself when it is a run's output_dir; NotARunFolder naming what is missing otherwise."""
    if not path.exists():
        raise NotARunFolder(f"{path}: no such folder; give the output_dir of a `finetune train` run")
    if not is_run_folder(path):
        raise NotARunFolder(
            f"{path}: not a run folder (none of {', '.join(MARKERS + ARTIFACTS)} in it); give the output_dir of a "
            "`finetune train` run, or the --out folder of `finetune demo`")
    return path


def run_folder_of(artifact: str | os.PathLike) -> Path | None:
    """The output_dir an artifact was written in (its own folder, or the run above a snapshot or pipeline
    folder), or None for a file outside any run."""
    path = Path(artifact).resolve()
    for folder in list(path.parents)[:3] if path.is_file() else [path, *list(path.parents)[:3]]:
        if any((folder / name).exists() for name in MARKERS):
            return folder
    return None


def find_recipe(output_dir: Path, info: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """(the resolved recipe, where it was found): run.json, the newest checkpoint's state.json, or the artifact's
    header (a LoRA, embedding or hypernetwork file's `finetune.recipe`, a pipeline's finetune.json)."""
    if info.get("recipe"):
        return info["recipe"], RUN_INFO
    states = sorted((output_dir / "checkpoints").glob("step-*/state.json"))
    for state in reversed(states):
        try:
            return json.loads(state.read_text())["recipe"], str(state.relative_to(output_dir))
        except (OSError, KeyError, json.JSONDecodeError):
            continue
    for name in ARTIFACTS:
        recipe = _artifact_recipe(output_dir / name)
        if recipe:
            return recipe, f"the header of {name}"
    return None, ""


def _artifact_recipe(path: Path) -> dict[str, Any] | None:
    try:
        if path.is_dir():
            text = json.loads((path / "finetune.json").read_text()).get("finetune.recipe")
        elif path.is_file():
            from finetune.io.safetensors_io import read_header

            text = read_header(path).metadata.get("finetune.recipe")
        else:
            return None
        return json.loads(text) if isinstance(text, str) else text
    except (OSError, ValueError, AttributeError):
        return None


def sample_grids(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every samples/step-N.png, in step order."""
    found = [(int(m.group(1)), p) for p in (output_dir / "samples").glob("step-*.png")
             if (m := SAMPLE_NAME.match(p.name))]
    return sorted(found)


def eval_figures(output_dir: Path) -> list[tuple[str, dict[str, Any]]]:
    """(label, figures) of every eval/*.json, by name."""
    found = []
    for path in sorted((output_dir / EVAL_DIR).glob("*.json")):
        try:
            figures = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(figures, dict):
            found.append((path.stem, figures))
    return found


def eval_label(output_dir: Path, artifact: str | os.PathLike | None, concept: str) -> str:
    """The file name (without .json) of an evaluation's figures: the concept, after the snapshot's step when the
    artifact judged is a snapshot (snapshots/step-000100/...)."""
    if artifact is not None:
        relative = Path(artifact).resolve().relative_to(output_dir.resolve()).parts
        if len(relative) > 1 and relative[0] == "snapshots":
            return f"{relative[1]}-{concept}"
    return concept


def folder_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def human_size(size: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def written_entries(output_dir: Path, since: float) -> list[tuple[Path, str]]:
    """(absolute path, what it is and what reads it) of every file or folder in output_dir written at or after
    `since` (time.time(); 0: everything), a run folder listed once as a whole: the end-of-run list
    (training/summary.py) and the report page's files."""
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
