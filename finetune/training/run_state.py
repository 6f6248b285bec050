"""What a set-up run holds: `Run` (what the steps need, as training/run.py's setup leaves it) and `Schedule` (the
recipe's numbers the steps read), apart from the setup that fills them so that both stay short."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from finetune.models import Components, ModelFamily
from finetune.recipe.schema import Recipe, SampleOptions
from finetune.training.attention import AttentionKernels
from finetune.training.grid_scores import GridScorer
from finetune.training.inputs import BatchEncoder
from finetune.training.saves import Saving
from finetune.training.step import LossSettings
from finetune.training.validation import ValidationScore

log = logging.getLogger("finetune.training.run")  # the name the setup's messages have always had


@dataclass(frozen=True)
class Schedule:
    """The recipe's numbers the steps read: how many, how each is made, and what happens after which."""
    max_steps: int
    accumulation: int  # train.gradient_accumulation_steps
    seed: int
    max_grad_norm: float  # 0: no clipping
    checkpoint_every: int  # 0: none (checkpoint.every)
    snapshot_every: int  # 0: none (checkpoint.snapshot_every)
    sample_every: int  # 0: none (sample.every)
    log_every: int
    sample: SampleOptions  # what a sample grid draws
    resolution: int  # data.resolution: the sample grid's size
    sample_rows: tuple = ()  # the grid's prompts, each with its settings (training/sample_prompts.SamplePrompt)


@dataclass
class Run:
    """What the steps need, as setup leaves it; `step` and `live` change as the run goes on."""
    accelerator: Any
    family: ModelFamily
    parts: Components
    strategy: Any
    optimizer: Any
    lr_scheduler: Any
    params: Any  # the prepared optimizer's parameters, clipped together
    trained: list[str]  # names of the trained modules in parts.modules
    trained_modules: list[torch.nn.Module]  # the same, unwrapped (the optimizer's state is gathered from them)
    encoder: BatchEncoder
    loader: Any  # the training images' micro-batches, from `step` on
    class_batches: Iterator | None  # prior preservation's class images, in step with `loader`
    settings: LossSettings
    schedule: Schedule
    saving: Saving
    offloaded: list  # modules offload_idle moved off the accelerator; sample grids bring them back
    base_dtype: torch.dtype
    started_at: float  # files written after this are the run's (summary.written_lines)
    summary: list[str]  # the plan's lines, for the live report
    caption_notes: list[str]
    # for the live report only (report/live.py reads the whole recipe) and the trackers' log.project / run_name
    recipe: Recipe
    attention: AttentionKernels  # train.attention resolved for this device; loop.py trains and samples inside it
    step: int = 0  # steps done: the checkpoint's step when resuming
    resume_from: Path | None = None  # the checkpoint setup read, for `resume` (loop.py)
    saved: tuple[dict, dict, dict] | None = None  # its state, held until `resume` puts it back
    live: Any = None  # the live report, while run_steps runs and for finish
    # what puts the weights to show and save in place (training/shown_weights.py): EMA, schedule-free averaging
    weight_views: list = field(default_factory=list)
    validation: ValidationScore | None = None  # validation's held-out images, scored by the loop
    ema: Any = None  # train.ema's average (training/ema.py): updated after each step, kept in checkpoints
    grid_scorer: GridScorer | None = None  # validation.clip_model / dino_model: scores each sample grid

    def say(self, text: str | None) -> None:
        """The main process speaks for all."""
        _say(self.accelerator, text)

    def close(self) -> None:
        close(self.accelerator)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _say(accelerator, text: str | None) -> None:
    if accelerator.is_main_process and text:
        log.info(text)


def close(accelerator) -> None:
    """End the run's trackers and, in a multi-process run, its process group, however the run ended."""
    accelerator.end_training()
    # without this a multi-process CPU run aborts at interpreter exit
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
