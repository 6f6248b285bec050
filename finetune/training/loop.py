"""The one training loop. Every strategy and model family runs through `train`; none has a loop of its own.

`train` runs four phases, each usable alone (tests give `setup` a family of their own and look at the Run):
`setup` (training/run.py: checks, the base, caches, the strategy's layers, the optimizer) -> `resume` (a
checkpoint's state put back) -> `run_steps` (step: training/step.py encodes, noises, predicts, weights; backward,
optimizer; then checkpoints, snapshots, samples, logs) -> `finish` (the final artifact).
Each micro-step reseeds from (seed, step, micro-step, process), so a resumed run repeats the uninterrupted
one exactly.
"""
from __future__ import annotations

import dataclasses
import signal
from pathlib import Path
from typing import Callable

import torch

from finetune.console import progress_bar
from finetune.draws import step_draws
from finetune.recipe.schema import Recipe
from finetune.report.live import LiveReport
from finetune.training import checkpoint, interrupt, saves, trackers
from finetune.training.attention import sdpa_kernels
from finetune.training.compile import CompileWatch
from finetune.training.ema import RAW_FOLDER
from finetune.training.failures import check_finite_loss
from finetune.training.host_copy import LaterOnHost
from finetune.training.inputs import ahead_on_device
from finetune.training.offload import on_device
from finetune.training.run import Run, setup
from finetune.training.sample_prompts import defaults_of, grid_labels
from finetune.training.shown_weights import shown_weights
from finetune.training.step import micro_step_loss
from finetune.training.summary import written_lines
from finetune.training.validation import validation_loss


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    return ((seed * 1_000_003 + step) * 1_009 + micro) * 10_007 + rank


def train(recipe: Recipe, resume: str | None = None, on_step: Callable[[int], None] | None = None,
          overwrite: bool = False) -> Path:
    """Run the recipe; return the path of the final artifact. `resume`: "latest" or a checkpoint folder.
    `overwrite`: start anew in an output_dir that holds a finished artifact or checkpoints (refused otherwise,
    see training/resume.py). `on_step(step)` is called after every optimizer step (benchmarks time the loop)."""
    with setup(recipe, resume=resume, overwrite=overwrite) as run:
        return _resume_run_finish(run, on_step)


def _resume_run_finish(run: Run, on_step: Callable[[int], None] | None) -> Path:
    # apart from train, whose `resume` argument hides the phase of that name
    if run.resume_from is not None:
        resume(run, run.resume_from)
    run_steps(run, on_step)
    return finish(run)


def resume(run: Run, path: Path) -> None:
    """Put back the state of the checkpoint at `path`: trained weights, optimizer, schedule and scaler. setup read
    it (setup(..., resume=...)) before any model loaded, so that a damaged checkpoint or a changed recipe fails
    cheaply and the data streams start at its step; `path` is the one it read (run.resume_from)."""
    if path != run.resume_from or run.saved is None:
        raise ValueError(f"setup read no checkpoint {path} to resume (it read {run.resume_from})")
    rates = saves.restore_checkpoint(run.accelerator, run.saved, run.step, run.strategy, run.optimizer,
                                     run.lr_scheduler, run.trained_modules)
    if run.ema is not None:  # train.ema's average, as the checkpoint's step left it
        run.ema.load_state_dict(run.saved[2]["ema"])
    run.saved = None  # put back now: holding it would keep a second copy of the optimizer's state
    run.say(f"resumed from {path} at step {run.step}; step {run.step + 1} trains at learning rate {rates[0]:g}")


def run_steps(run: Run, on_step: Callable[[int], None] | None = None) -> None:
    """Train from run.step to the schedule's last step, saving checkpoints, snapshots and samples on the way.
    `on_step(step)` is called after every optimizer step. Raises interrupt.Interrupted when stopped by a signal
    (a checkpoint saved first), training/failures.py's errors when the loss diverges or a save fails.

    No step waits for the device: each step's loss stays on it until a read point, where the losses since the
    last one come back together and are checked and recorded step by step, as if read at each step
    (history.jsonl, the report, the bar and trackers get every value they got before). A log point (every
    log.every steps) reads up to the step before it, one step late, so the device is never idle while the host
    waits; the last step, a step that saves a checkpoint, snapshot or sample grid, and a stop request read all.
    A loss that stopped being finite at step k stops the run there, naming step k, before anything is saved: the
    steps run after k are thrown away with their weights."""
    accelerator, parts, strategy, optimizer = run.accelerator, run.parts, run.strategy, run.optimizer
    s, output_dir = run.schedule, run.saving.output_dir
    if accelerator.is_main_process:
        trackers.start(accelerator, run.recipe.log.project, run.recipe.log.run_name, run.saving.recipe,
                       str(output_dir / "logs"))
    step = run.step
    # a strategy may stop training the text encoders part-way (DreamBooth's text_encoder_steps): looked at again
    # only when its on_step_end says what trains changed (a scan of every parameter)
    settings = dataclasses.replace(run.settings, text_encoder_trains=_text_encoder_trains(parts))
    # history.jsonl, report.html
    run.live = live = LiveReport(accelerator, run.recipe, output_dir, step, run.summary, run.caption_notes)
    progress = progress_bar(total=s.max_steps, initial=step, desc="training", unit="step", dynamic_ncols=True,
                            disable=not accelerator.is_local_main_process)
    batches = ahead_on_device(iter(run.loader), run.encoder)
    class_batches = ahead_on_device(run.class_batches, run.encoder) if run.class_batches is not None else None
    unread = UnreadLosses()
    compiled = CompileWatch()  # train.compile: the first step's compile time, and any recompile after it
    with interrupt.stop_on_signals() as stop, progress, live:  # the bar closes before any message that stops the run
        while step < s.max_steps:
            live.start_step()
            losses = []
            lr = float(optimizer.param_groups[0]["lr"])  # what this step's optimizer.step() uses: logged for it
            # SDPA kernels as train.attention allows (attention.py): the steps' forward, backward and recomputation
            # only; sample grids draw with PyTorch's choice (a part kept in fp32, SDXL's VAE, could not use flash)
            with sdpa_kernels(run.attention):
                for micro in range(s.accumulation):
                    batch = next(batches)
                    class_batch = next(class_batches) if class_batches is not None else None
                    seed = step_seed(s.seed, step, micro, accelerator.process_index)
                    torch.manual_seed(seed)  # dropout and anything else drawing from the global generator
                    with accelerator.accumulate(*[parts.modules[name] for name in run.trained]):
                        loss = micro_step_loss(run.family, parts, strategy, batch, class_batch,
                                               step_draws(seed, accelerator.device), settings, run.encoder)
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and s.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(run.params, s.max_grad_norm)  # its norm stays on the device
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    losses.append(loss.detach())
            run.lr_scheduler.step()
            if strategy.on_step_end(step + 1):
                settings = dataclasses.replace(settings, text_encoder_trains=_text_encoder_trains(parts))
            run.step = step = step + 1
            if run.ema is not None:
                run.ema.after_step(step)  # after on_step_end, which may put frozen rows back
            unread.add(step, torch.stack(losses).mean(), lr, accelerator)
            live.end_step(step)
            if on_step is not None:
                on_step(step)
            run.say(compiled.news(step))
            progress.update(1)
            saved = bool(s.checkpoint_every and step % s.checkpoint_every == 0 and step < s.max_steps)
            snapshot = bool(s.snapshot_every and step % s.snapshot_every == 0 and step < s.max_steps)
            sample = bool(s.sample_every and step % s.sample_every == 0)
            validating = run.validation is not None and run.validation.due(step)
            # a save, a sample grid, a stop and the last step read every loss, this step's too (the NaN check comes
            # before anything is written); a log point reads up to the step before, whose work is done by now
            every_loss = (step == s.max_steps or saved or snapshot or sample or validating
                          or stop.seen_here(accelerator))
            if not (every_loss or step % s.log_every == 0):
                continue
            # validation.every: the held-out loss of the weights the run shows, read now (a read point)
            held_out = None
            if validating:
                with sdpa_kernels(run.attention), shown_weights(run.weight_views):
                    held_out = validation_loss(run, settings)
            for done, mean_loss, done_lr in unread.read(latest_too=every_loss):
                # the same reduced value on every process, so all of them stop together
                check_finite_loss(mean_loss, done, output_dir, run.saving.recovery)
                # drawn by update, which keeps to the bar's pace (without a terminal, a line every 30 s)
                progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{done_lr:.2e}", refresh=False)
                live.record(done, mean_loss, done_lr, checkpoint=saved and done == step,
                            validation_loss=held_out if done == step else None)
                if done % s.log_every == 0:
                    accelerator.log({"loss": mean_loss, "lr": done_lr}, step=done)
            if held_out is not None:
                accelerator.log({"validation/loss": held_out}, step=step)
            if saved:
                _save_checkpoint(run)
            # asked to stop: no snapshot and no sample grid at this step (a grid can take longer than the step)
            stopping = stop.requested_anywhere(accelerator)
            if snapshot and not stopping:
                _save_artifact(run, output_dir / "snapshots" / f"step-{step:06d}")
            if sample and not stopping:
                with on_device(run.offloaded, accelerator.device), shown_weights(run.weight_views):
                    drawn = saves.save_samples(accelerator, run.saving, run.family, parts, s.sample_rows,
                                               s.sample.images_per_prompt, step, strategy, run.base_dtype)
                # validation.clip_model / dino_model: the grid's scores, on its step's history line (main process)
                scores = run.grid_scorer.score(drawn, [r.prompt for r in s.sample_rows]) if (
                    run.grid_scorer is not None and drawn is not None) else {}
                if scores:
                    accelerator.log({f"validation/{key}": value for key, value in scores.items()}, step=step)
                live.sampled(step, grid_labels(s.sample_rows, defaults_of(s.sample, s.resolution)), scores)
            if step < s.max_steps and stopping:
                if not saved:
                    _save_checkpoint(run)
                raise interrupt.Interrupted(
                    f"stopped on {signal.Signals(stop.signum or signal.SIGINT).name} after step {step} of "
                    f"{s.max_steps}; the checkpoint is in {checkpoint.checkpoints_dir(output_dir)}. Continue "
                    f"with:\n  {run.saving.command}", stop.signum or signal.SIGINT)


class UnreadLosses:
    """Steps' losses not read yet, in step order, with the rate each trained at. When a step ends its loss is
    averaged over the processes (a collective queued on the device) and copied to the host behind that step's
    work (training/host_copy.py): reading it later waits for that step alone, not for the steps queued after it,
    so a read one step late finds it done while the device runs the next step."""

    def __init__(self) -> None:
        self.pending: list[tuple[int, LaterOnHost, float]] = []  # step, its loss on the way to the host, lr

    def add(self, step: int, loss: torch.Tensor, lr: float, accelerator) -> None:
        """`loss`: the step's mean loss, a 0-d tensor on the device. Every process must add at the same step."""
        self.pending.append((step, LaterOnHost(accelerator.reduce(loss.detach(), reduction="mean")), lr))

    def read(self, latest_too: bool = True) -> list[tuple[int, float, float]]:
        """(step, loss averaged over the processes, lr) of each unread step, oldest first; with `latest_too` false
        the newest stays unread (read one step late: its work may still be running). Waits only for the steps it
        reads. Reading happens on every process at the same steps (the loop's read points)."""
        taken = self.pending if latest_too else self.pending[:-1]
        self.pending = self.pending[len(taken):]
        values = torch.stack([loss.value() for _, loss, _ in taken]).tolist() if taken else []
        return [(step, value, lr) for (step, _, lr), value in zip(taken, values)]


def _text_encoder_trains(parts) -> bool:
    return any(p.requires_grad for module in parts.text_encoder_modules().values() for p in module.parameters())


def _save_checkpoint(run: Run) -> None:
    saves.save_checkpoint(run.accelerator, run.saving, run.step, run.strategy, run.optimizer, run.lr_scheduler,
                          run.trained_modules, extra_state={"ema": run.ema.state_dict()} if run.ema else None)


def _save_artifact(run: Run, folder: Path) -> Path:
    """The artifact in `folder` with the weights the run shows (train.ema: the average, with the weights as
    trained beside it in raw/, each header saying which it holds)."""
    ema = run.ema
    if ema is not None:
        saves.save_artifact(run.accelerator, run.saving, run.strategy, run.step, folder / RAW_FOLDER,
                            ema.header(shows_average=False))
    with shown_weights(run.weight_views):
        return saves.save_artifact(run.accelerator, run.saving, run.strategy, run.step, folder,
                                   ema.header(shows_average=True) if ema else None)


def finish(run: Run) -> Path:
    """Write the final artifact and the report's last version; say what the run wrote. Returns the artifact."""
    artifact = _save_artifact(run, run.saving.output_dir)
    if run.live is not None:
        run.live.finish()  # the page's last version, before the list of what was written (which names it)
    if run.accelerator.is_main_process:
        run.say("wrote:\n" + "\n".join(written_lines(run.saving.output_dir, run.started_at)))
    return artifact
