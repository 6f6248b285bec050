"""What can go wrong in the middle of a run, said plainly: a loss or weights that stop being finite, a full disk.

Either way the run stops with its last good checkpoint kept: a checkpoint is written only from finite weights,
and a save that fails leaves no half-written file behind.
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError

from finetune.data.sources import some
from finetune.file_errors import NO_ROOM, NOT_WRITABLE, FileProblem, error_number


class TrainingDiverged(ValueError):
    """The loss or the trained weights became NaN or infinite."""


class SaveFailed(ValueError):
    """A checkpoint, artifact or sample grid could not be written for want of room or of permission."""


def _last_good(output_dir: Path) -> str:
    from finetune.training.checkpoint import find_checkpoint

    last_checkpoint = find_checkpoint(output_dir, "latest")  # looked up only once something went wrong
    if last_checkpoint is None:
        return "There is no checkpoint yet (checkpoint.every keeps one every N steps)"
    return f"The last good checkpoint, {last_checkpoint}, is kept"


def check_finite_loss(loss: float, step: int, learning_rate: float, output_dir: Path) -> None:
    if math.isfinite(loss):
        return
    raise TrainingDiverged(
        f"the loss became {loss} at step {step}: training diverged, so it stopped there and saved nothing from "
        f"this step on. {_last_good(output_dir)}. Lower train.learning_rate (now {learning_rate:g}), keep "
        "train.max_grad_norm on (1.0 clips the gradients), or prefer bf16 to fp16, and train again")


def check_finite_weights(tensors: dict[str, torch.Tensor], step: int, output_dir: Path) -> None:
    """Before anything is saved: weights with NaN or infinity must never become the latest checkpoint."""
    bad = [name for name, tensor in tensors.items()
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if not bad:
        return
    raise TrainingDiverged(
        f"the trained weights became NaN or infinite by step {step} ({some(bad, limit=3)}): training diverged, so nothing was "
        f"saved. {_last_good(output_dir)}. Lower train.learning_rate, keep train.max_grad_norm on (1.0), or "
        "prefer bf16 to fp16, and train again")


@contextmanager
def saving(what: str, step: int, resume_with: str, output_dir: Path) -> Iterator[None]:
    """Turn "no space left" (or a folder that turned read-only) while writing `what` into a message that says
    what was kept and how to go on (`resume_with`: the command that continues the run). The error is recognised
    however the library reports it (finetune/file_errors.py: OSError, safetensors' SafetensorError, torch.save's
    RuntimeError). The writers themselves remove their temporary files when they fail."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError, FileProblem) as exc:
        number = exc.errno if isinstance(exc, FileProblem) else error_number(exc)
        if number not in NO_ROOM | NOT_WRITABLE:
            raise
        path = exc.path if isinstance(exc, FileProblem) else getattr(exc, "filename", None)
        where = f" ({path})" if path else ""
        problem = "no room left on the disk" if number in NO_ROOM else "the disk refused the write"
        fix = ("Free some space (or point output_dir at a disk with room)" if number in NO_ROOM else
               "Make output_dir writable again (or point output_dir at a folder you can write to)")
        raise SaveFailed(
            f"{problem} while writing {what} at step {step}{where}: {os.strerror(number)}. Nothing "
            f"half-written was left behind. {_last_good(output_dir)}. {fix}, then continue with: {resume_with}"
        ) from None
