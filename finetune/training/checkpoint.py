"""Checkpoints: trainable weights, optimizer, LR schedule and step, written to a temporary folder and renamed,
so a folder named `step-N` is always complete. RNG state needs no saving: the loop reseeds from (seed, step).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from finetune.export.pickle_files import UnsafePickleError, load_plain_pickle
from finetune.export.safetensors_io import save_safetensors

_NAME = re.compile(r"^step-(\d+)$")
STATE_FILE = "state.json"


class CheckpointError(ValueError):
    pass


def checkpoints_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def save_checkpoint(output_dir: str | os.PathLike, step: int, trainable: dict[str, torch.Tensor],
                    training_state: dict[str, Any], recipe: dict[str, Any], keep: int) -> Path:
    """training_state: {"optimizer": ..., "lr_scheduler": ..., "scaler": ...} state dicts; `recipe`: the run's
    whole resolved recipe (recipe_to_dict), kept in state.json so a resume can be compared with it."""
    root = checkpoints_dir(output_dir)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_safetensors(trainable, tmp / "trainable.safetensors")
        torch.save(training_state, tmp / "training_state.pt")
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, "recipe": recipe}, indent=2, sort_keys=True))
        for name in os.listdir(tmp):
            with open(tmp / name, "rb") as handle:
                os.fsync(handle.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed save (full disk, Ctrl-C) leaves nothing half-written
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_directory(root)  # the rename itself reaches the disk before older checkpoints are pruned
    _prune(root, keep)
    return final


def _fsync_directory(path: Path) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _completed(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _NAME.match(entry.name)
        if match and (entry / STATE_FILE).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def _prune(root: Path, keep: int) -> None:
    for _, path in _completed(root)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def find_checkpoint(output_dir: str | os.PathLike, which: str) -> Path | None:
    """`latest` -> the newest complete checkpoint in output_dir, or None when there is none yet (a run killed
    before its first checkpoint starts again from step 0, so one command always finishes it); otherwise a
    checkpoint folder path."""
    if which == "latest":
        completed = _completed(checkpoints_dir(output_dir))
        return completed[-1][1] if completed else None
    path = Path(which)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"--resume {which}: not a checkpoint folder (no {STATE_FILE}); "
                              f"give a folder like {checkpoints_dir(output_dir)}/step-000100 or `latest`")
    return path


def load_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """Returns (state.json contents, trainable tensors, training_state). Only plain tensors are unpickled."""
    state = json.loads((path / STATE_FILE).read_text())
    trainable = load_file(str(path / "trainable.safetensors"))
    try:
        training_state = load_plain_pickle(path / "training_state.pt", "checkpoint's training state")
    except UnsafePickleError as exc:
        raise CheckpointError(f"--resume {path}: {exc}") from None
    return state, trainable, training_state


def remove_stale_temporaries(output_dir: str | os.PathLike) -> list[Path]:
    """What a killed run left half-written: `.NAME.tmp-PID` and `.NAME.tmp` files and folders (atomic saves)
    and `.tmp-step-N` checkpoint folders. Only complete files are ever renamed into place, so these are never
    needed again."""
    output_dir = Path(output_dir)
    folders = (output_dir, *[d for d in output_dir.glob("*") if d.is_dir()])
    stale = [p for folder in folders for pattern in (".*.tmp-*", ".*.tmp") for p in folder.glob(pattern)]
    stale += list(checkpoints_dir(output_dir).glob(".tmp-step-*"))
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale
