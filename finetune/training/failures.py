"""What can go wrong in the middle of a run, said plainly: a loss or weights that stop being finite, a full disk.

Either way the run stops with its last good checkpoint kept: a checkpoint is written only from finite weights,
and a save that fails leaves no half-written file behind. Every command a message prints runs as printed: after a
NaN, the run's own command at a tenth of the rate, with `--resume latest` (which accepts that change) and with
`--overwrite` (tests/e2e/test_failures.py runs both).
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
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


def _last_good(output_dir: Path) -> Path | None:
    from finetune.training.checkpoint import find_checkpoint

    return find_checkpoint(output_dir, "latest")  # looked up only once something went wrong


def _kept(checkpoint: Path | None) -> str:
    if checkpoint is None:
        return "There is no checkpoint yet (checkpoint.every keeps one every N steps)"
    return f"The last good checkpoint, {checkpoint}, is kept"


def _yaml_number(value: float) -> str:
    """Three significant digits, written so that YAML reads a float back: it reads "1e-05" as text, "1.0e-05" as
    a number."""
    mantissa, e, exponent = f"{value:.3g}".partition("e")
    return (mantissa if "." in mantissa else f"{mantissa}.0") + e + exponent


@dataclass(frozen=True)
class Recovery:
    """What a diverged run suggests: `change` says what the commands change; `resume` goes on from the last good
    checkpoint with it (a resume accepts these changes, training/resume.py; with no checkpoint it starts at step
    0); `restart` starts the run again from step 0 with it, replacing the run's checkpoints."""
    change: str
    resume: str
    restart: str

    def advice(self, checkpoint: Path | None) -> str:
        if checkpoint is None:
            return f"Train again from step 0 with {self.change}:\n  {self.resume}"
        return (f"Go on from it with {self.change}:\n  {self.resume}\nIf it diverges again from there, the "
                "checkpoint is already too far gone: start again from step 0 with the same change, replacing this "
                f"run's checkpoints:\n  {self.restart}")


def divergence_advice(recipe) -> Recovery:
    """After a NaN: the command that started the run with a tenth of its learning rate (strategy.learning_rate
    where the recipe sets it, else train.learning_rate) and, when clipping was off, train.max_grad_norm=1.0, each
    replacing the command line's own value. `recipe`: a Recipe (source, overrides, rate, clipping, precision)."""
    from finetune.training.resume import resume_command

    key = "strategy.learning_rate" if recipe.strategy.learning_rate else "train.learning_rate"
    rate = recipe.strategy.learning_rate or recipe.train.learning_rate
    changes = {key: _yaml_number(rate / 10)}
    said = [f"a tenth of the learning rate ({key} {rate:g} -> {changes[key]})"]
    if recipe.train.max_grad_norm == 0:
        changes["train.max_grad_norm"] = "1.0"
        said.append("the gradients clipped (train.max_grad_norm 0 -> 1.0)")
    if recipe.train.mixed_precision == "fp16":
        said[-1] += " (fp16 overflows where bf16 does not: prefer train.mixed_precision: bf16 where the GPU has it)"
    overrides = [item for item in recipe.overrides if item.partition("=")[0].strip() not in changes]
    overrides += [f"{key}={value}" for key, value in changes.items()]
    resume = resume_command(recipe.source, overrides)
    return Recovery(" and ".join(said), resume, resume.removesuffix(" --resume latest") + " --overwrite")


def check_finite_loss(loss: float, step: int, output_dir: Path, recovery: Recovery) -> None:
    """Raise TrainingDiverged when `loss` is NaN or infinite, saying what was kept and how to go on."""
    if math.isfinite(loss):
        return
    checkpoint = _last_good(output_dir)
    raise TrainingDiverged(
        f"the loss became {loss} at step {step}: training diverged, so it stopped there and saved nothing from "
        f"this step on. {_kept(checkpoint)}. {recovery.advice(checkpoint)}")


def check_finite_weights(tensors: dict[str, torch.Tensor], step: int, output_dir: Path, recovery: Recovery) -> None:
    """Before anything is saved: weights with NaN or infinity must never become the latest checkpoint."""
    bad = [name for name, tensor in tensors.items()
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if not bad:
        return
    checkpoint = _last_good(output_dir)
    raise TrainingDiverged(
        f"the trained weights became NaN or infinite by step {step} ({some(bad, limit=3)}): training diverged, so "
        f"nothing was saved. {_kept(checkpoint)}. {recovery.advice(checkpoint)}")


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
            f"half-written was left behind. {_kept(_last_good(output_dir))}. {fix}, then continue with: {resume_with}"
        ) from None
