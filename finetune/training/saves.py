"""What the loop writes while it runs: checkpoints, artifacts (final and snapshots) and sample grids.

Every save is checked first (weights that stopped being finite are never written) and guarded (a full disk
stops the run with a message, the last good checkpoint kept); only the main process writes.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Sequence

import torch

from finetune.io.safetensors_io import training_metadata
from finetune.models import Components, ModelFamily
from finetune.training import checkpoint, trackers
from finetune.training.failures import Recovery, check_finite_weights, saving
from finetune.training.optim import set_base_rates
from finetune.training.control_images import with_controls
from finetune.training.sample_prompts import SamplePrompt
from finetune.training.sampling import draw_rows, plain_forward, rows_grid, save_png
from finetune.distributed import load_optimizer_state_dict, optimizer_state_dict


@dataclass(frozen=True)
class Saving:
    """What every save knows of its run, worked out once when the run is set up (training/run.py)."""
    output_dir: Path  # the run's folder: checkpoints go here, and messages name it
    command: str  # the command that resumes this run (resume.resume_command), said when a save fails
    recovery: Recovery  # what a non-finite weight tells the user to run (failures.divergence_advice)
    recipe: dict  # the resolved recipe (recipe_to_dict), kept in every checkpoint and artifact header
    keep: int  # checkpoint.keep: how many checkpoints stay
    base_model: str  # model.base, as the artifact header names it
    kind: str  # strategy.kind, as the artifact header names it
    data_figures: dict[str, object]  # what the header says about the data (kohya's ss_num_train_images, ...)
    family_header: dict[str, str]  # the keys other programs tell the base family by (export/family_header.py)


def save_checkpoint(accelerator, saving_to: Saving, step: int, strategy, optimizer, lr_scheduler,
                    models: list[torch.nn.Module], extra_state: dict | None = None) -> None:
    """`models`: the trained modules (the optimizer's state is gathered from a sharded one); `extra_state`: more
    of the training state by name (train.ema's average), kept in training_state.pt beside the optimizer's."""
    # on every process: gathering sharded weights is collective, and a non-finite weight stops all together
    trainable = strategy.state_dict()
    check_finite_weights(trainable, step, saving_to.output_dir, saving_to.recovery)
    optimizer_state = optimizer_state_dict(optimizer, models)
    if accelerator.is_main_process:
        training_state = {"optimizer": optimizer_state, "lr_scheduler": lr_scheduler.state_dict(),
                          **(extra_state or {})}
        if accelerator.scaler is not None:
            training_state["scaler"] = accelerator.scaler.state_dict()
        with saving("a checkpoint", step, saving_to.command, saving_to.output_dir):
            checkpoint.save_checkpoint(saving_to.output_dir, step, trainable, training_state, saving_to.recipe,
                                       saving_to.keep)
    accelerator.wait_for_everyone()


def restore_checkpoint(accelerator, saved: tuple[dict, dict, dict], step: int, strategy, optimizer, lr_scheduler,
                       models: list[torch.nn.Module]) -> list[float]:
    """Put back what save_checkpoint wrote (`saved`: resume.load_for_resume's state, trainable weights and
    training state) for a run going on after `step`. The recipe's learning rates rule from here over the ones the
    optimizer state restores (a resume may change them, training/resume.py). Returns the rates of step + 1."""
    recipe_rates = list(lr_scheduler.base_lrs)  # built from this recipe; the state below holds the checkpoint's
    _, trainable, training_state = saved
    strategy.load_state_dict(trainable)
    load_optimizer_state_dict(optimizer, models, training_state["optimizer"])
    lr_scheduler.load_state_dict(training_state["lr_scheduler"])
    if accelerator.scaler is not None and "scaler" in training_state:
        accelerator.scaler.load_state_dict(training_state["scaler"])
    strategy.on_step_end(step)  # a strategy whose setup changes with the step catches up
    return set_base_rates(lr_scheduler, recipe_rates)


def save_artifact(accelerator, saving_to: Saving, strategy, step: int, folder: Path,
                  header: dict[str, str] | None = None) -> Path:
    """Write the artifact into `folder` (the run's folder, or a snapshot's); messages name the run's folder.
    `header`: more keys for its metadata (which weights it holds: train.ema's)."""
    # on every process: a sharded strategy gathers its weights here, which its save (main process) writes
    check_finite_weights(strategy.state_dict(), step, saving_to.output_dir, saving_to.recovery)
    artifact = folder / strategy.artifact_name
    if accelerator.is_main_process:
        metadata = training_metadata(base_model=saving_to.base_model, strategy=saving_to.kind, steps=step,
                                     recipe=saving_to.recipe, extra=saving_to.data_figures)
        metadata.update(saving_to.family_header)
        metadata.update(header or {})
        with saving(f"the artifact in {folder}", step, saving_to.command, saving_to.output_dir):
            artifact = strategy.save(folder, metadata)
    accelerator.wait_for_everyone()
    return artifact


def save_samples(accelerator, saving_to: Saving, family: ModelFamily, parts: Components, rows: Sequence[SamplePrompt],
                 images_per_prompt: int, step: int, strategy, dtype: torch.dtype) -> list[list] | None:
    """A sample grid, one row per prompt with its own settings (`rows`, training/sample_prompts.py), drawn as a
    user's pipeline draws it after loading the artifact onto the base in `dtype` (the frozen base's dtype): no
    autocast, the trained weights in the dtype that loading gives them (`strategy.as_loaded`), every module in
    eval mode. Returns the grid's images, a list per row, on the main process (None on the others)."""
    drawn = None
    if accelerator.is_main_process:
        pipeline = family.pipeline(parts, unwrap=accelerator.unwrap_model)
        modules = [m for m in pipeline.components.values() if isinstance(m, torch.nn.Module)]
        modes = [m.training for m in modules]
        for m in modules:
            m.eval()  # no dropout in samples
        with plain_forward(modules), strategy.as_loaded(dtype):
            drawn = draw_rows(pipeline, list(rows), images_per_prompt,
                              encode=partial(family.encode_prompts, parts) if parts.max_token_length else None,
                              control=family.sample_kwargs)
        grid = rows_grid(with_controls(drawn, [row.control_images for row in rows]))
        for m, mode in zip(modules, modes):
            m.train(mode)
        with saving("a sample grid", step, saving_to.command, saving_to.output_dir):
            save_png(grid, saving_to.output_dir / "samples" / f"step-{step:06d}.png")
        trackers.log_images(accelerator, "samples", grid, step)
    accelerator.wait_for_everyone()
    return drawn
