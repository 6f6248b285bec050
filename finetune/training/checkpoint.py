"""Checkpoints: trainable weights, optimizer, LR schedule and step, written to a temporary folder and renamed,
so a folder named `step-N` is always complete. RNG state needs no saving: the loop reseeds from (seed, step).
A folder damaged since (a sync client, a copy cut short, a file removed by hand) is named when a resume meets
it, never skipped in silence: `checkpoint_problem` says what is wrong with it, and resume.py offers the newest
good one.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from finetune.file_errors import CUT_SHORT, FileProblem, reading, writing
from finetune.io.atomic import atomic_dir, stale_temporaries
from finetune.io.pickle_files import UnsafePickleError, load_plain_pickle, save_pickle
from finetune.io.safetensors_io import load_tensors, save_safetensors

_NAME = re.compile(r"^step-(\d+)$")
STATE_FILE = "state.json"


class CheckpointError(ValueError):
    pass


class DamagedCheckpoint(CheckpointError):
    """A `step-N` folder that lacks a file or holds one cut short; `path` is the folder, `problem` what is
    wrong with it."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"checkpoint {path} is damaged: {problem}")
        self.path, self.problem = path, problem


def checkpoints_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def save_checkpoint(output_dir: str | os.PathLike, step: int, trainable: dict[str, torch.Tensor],
                    training_state: dict[str, Any], recipe: dict[str, Any], keep: int) -> Path:
    """training_state: {"optimizer": ..., "lr_scheduler": ..., "scaler": ...} state dicts; `recipe`: the run's
    whole resolved recipe (recipe_to_dict), kept in state.json so a resume can be compared with it."""
    root = checkpoints_dir(output_dir)
    final = root / f"step-{step:06d}"
    # named by its final folder: the temporary one is gone. Durable: every file and the rename itself reach the
    # disk before older checkpoints are pruned
    with writing(final, "a checkpoint"), atomic_dir(final, durable=True) as tmp:
        save_safetensors(trainable, tmp / "trainable.safetensors")
        save_pickle(training_state, tmp / "training_state.pt")
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, "recipe": recipe}, indent=2, sort_keys=True))
    _prune(root, keep)
    return final


def _completed(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _NAME.match(entry.name)
        if match and (entry / STATE_FILE).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def _step_folders(root: Path) -> list[tuple[int, Path]]:
    """Every `step-N` folder, complete or not, oldest first."""
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), entry) for entry in root.iterdir() if (m := _NAME.match(entry.name)))


def checkpoint_problem(path: Path) -> str | None:
    """What is wrong with the checkpoint folder `path` (a file missing, or cut short), or None when it looks
    whole. Cheap: safetensors checks its header against the file's size, and a .pt (a zip) whose end is missing
    has no central directory; no tensor data is read."""
    import zipfile

    missing = [name for name in (STATE_FILE, "trainable.safetensors", "training_state.pt")
               if not (path / name).is_file()]
    if missing:
        return f"it has no {' and no '.join(missing)}"
    try:
        json.loads((path / STATE_FILE).read_text())
        with reading(*_its("trainable.safetensors", path)), safe_open(str(path / "trainable.safetensors"), "pt"):
            pass
        with reading(*_its("training_state.pt", path)), zipfile.ZipFile(path / "training_state.pt"):
            pass
    except FileProblem as exc:
        return str(exc)
    except json.JSONDecodeError as exc:
        return f"its {STATE_FILE} {CUT_SHORT} ({exc})"
    return None


def _its(name: str, folder: Path) -> tuple[Path, str, str]:
    """reading()'s arguments for a file of a checkpoint folder."""
    return folder / name, "its file", "no run can continue from it"


def good_checkpoints(root: Path, before: int | None = None) -> list[Path]:
    """The checkpoint folders in `root` (output_dir/checkpoints) that look whole (checkpoint_problem), newest
    first; only those older than step `before` when given."""
    folders = _step_folders(root)
    return [path for step, path in reversed(folders)
            if (before is None or step < before) and checkpoint_problem(path) is None]


def step_of(path: Path) -> int | None:
    """N of a `step-N` folder; None for any other name."""
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else None


def _prune(root: Path, keep: int) -> None:
    for _, path in _completed(root)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def find_checkpoint(output_dir: str | os.PathLike, which: str) -> Path | None:
    """`latest` -> the newest checkpoint folder in output_dir, or None when there is none yet (a run killed
    before its first checkpoint starts again from step 0, so one command always finishes it); otherwise a
    checkpoint folder path. The newest folder is returned even when damaged since it was written (no
    state.json, say): load_checkpoint then names it, rather than a resume falling back steps without a word."""
    if which == "latest":
        folders = _step_folders(checkpoints_dir(output_dir))
        return folders[-1][1] if folders else None
    path = Path(which)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"--resume {which}: not a checkpoint folder (no {STATE_FILE}); "
                              f"give a folder like {checkpoints_dir(output_dir)}/step-000100 or `latest`")
    return path


def load_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """Returns (state.json contents, trainable tensors, training_state). Only plain tensors are unpickled.
    Raises DamagedCheckpoint when a file is missing, cut short or damaged."""
    problem = checkpoint_problem(path)
    if problem is not None:
        raise DamagedCheckpoint(path, problem)
    try:
        state = json.loads((path / STATE_FILE).read_text())
        trainable = load_tensors(*_its("trainable.safetensors", path))
        training_state = load_plain_pickle(*_its("training_state.pt", path)[:2], fix=_its("", path)[2])
    except UnsafePickleError as exc:
        raise CheckpointError(f"--resume {path}: {exc}") from None
    except FileProblem as exc:  # damaged in a way the cheap look could not see
        raise DamagedCheckpoint(path, str(exc)) from None
    return state, trainable, training_state


def remove_stale_temporaries(output_dir: str | os.PathLike) -> list[Path]:
    """What a killed run left half-written in output_dir and the folders in it: the temporary files and folders
    of finetune.io.atomic (`.NAME.tmp-PID`, and `.NAME.old-PID` once NAME is back). Only complete files are
    ever renamed into place, so these are never needed again."""
    output_dir = Path(output_dir)
    folders = (output_dir, *[d for d in output_dir.glob("*") if d.is_dir()])
    stale = [p for folder in folders for p in stale_temporaries(folder)]
    # the names temporaries had before finetune.io.atomic gave them one rule (`.NAME.tmp`, `.NAME.PID.tmp`, and
    # `checkpoints/.tmp-step-N`): a run killed before that change still resumes clean
    stale += [p for folder in folders for p in folder.glob(".*.tmp")]
    stale += list(checkpoints_dir(output_dir).glob(".tmp-step-*"))
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale
