"""The one training loop. Every strategy and model family runs through `train`; none has a loop of its own.

Order of work: check data and checkpoint (cheap, can fail) -> load the frozen base -> class images for prior
preservation (drawn by the untouched base) -> let the strategy inject what trains -> step (training/step.py:
encode, noise, predict, weight), backward, optimizer -> checkpoints, samples, logs -> final artifact.
Each micro-step reseeds from (seed, step, micro-step, process), so a resumed run repeats the uninterrupted
one exactly.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import signal
import time
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from finetune.console import ensure_configured, progress_bar
from finetune.data import BatchOrder, ImageCaptionDataset, make_loader
from finetune.data.prepare import prepare_data, trained_examples
from finetune.data.sources import data_name, tag_frequency
from finetune.data.buckets import format_report, write_report
from finetune.data.captions import caption_report
from finetune.data.caches import estimated_bytes, plan_caches
from finetune.export.family_header import family_fields, family_version
from finetune.models import family_for
from finetune.models.family import refusal
from finetune.models.pipeline_folder import downsampling_of, latent_channels_of
from finetune.models.quantize import quantize_weights
from finetune.recipe.load import RecipeError, options_for, recipe_to_dict
from finetune.recipe.schema import Recipe
from finetune.report.live import LiveReport
from finetune.strategies import create_strategy
from finetune.training import checkpoint, interrupt, prior, saves, trackers
from finetune.training.inputs import make_encoder
from finetune.training.engine import (enable_gradient_checkpointing, engine_report, has_accelerator,
                                      prepare_for_training, refuse_unsharded_work, requested_engine,
                                      sharding_report)
from finetune.training.failures import check_finite_loss, divergence_advice
from finetune.training.offload import offload_idle, on_device, one_at_a_time
from finetune.training.optim import build_optimizer, build_scheduler
from finetune.distributed import local_fraction
from finetune.training.resume import (check_output_dir, check_resumable, load_for_resume, remove_earlier_run,
                                      resume_command)
from finetune.training.step import LossSettings, micro_step_loss
from finetune.training.summary import Plan, images_per_folder, plan_lines, written_lines

log = logging.getLogger(__name__)  # the toolkit's own messages: finetune/console.py styles them
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def weight_dtype(model_dtype: str, mixed_precision: str) -> torch.dtype:
    """dtype of the frozen base: as asked, or following mixed precision when "auto"."""
    if model_dtype == "auto":
        return DTYPES.get(mixed_precision, torch.float32)
    return DTYPES[model_dtype]


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    return ((seed * 1_000_003 + step) * 1_009 + micro) * 10_007 + rank


def train(recipe: Recipe, resume: str | None = None, on_step: Callable[[int], None] | None = None,
          overwrite: bool = False) -> Path:
    """Run the recipe; return the path of the final artifact. `resume`: "latest" or a checkpoint folder.
    `overwrite`: start anew in an output_dir that holds a finished artifact or checkpoints (refused otherwise,
    see training/resume.py). `on_step(step)` is called after every optimizer step (benchmarks time the loop)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    ensure_configured()
    t = recipe.train
    output_dir = Path(recipe.output_dir).expanduser()
    accelerator = Accelerator(
        cpu=not has_accelerator(),  # accelerate only runs multi-process CPU jobs (torchrun) when told cpu=True
        mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.gradient_accumulation_steps,
        log_with=recipe.log.to or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")))
    try:
        return _train(accelerator, recipe, output_dir, resume, on_step, overwrite)
    finally:
        accelerator.end_training()
        # without this a multi-process CPU run aborts at interpreter exit
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(accelerator, recipe: Recipe, output_dir: Path, resume: str | None,
           on_step: Callable[[int], None] | None, overwrite: bool) -> Path:
    def say(text: str | None) -> None:  # the main process speaks for all
        if accelerator.is_main_process and text:
            log.info(text)

    t, d = recipe.train, recipe.data
    started_at = time.time() - 1  # file times may be rounded down to the second
    engine, mismatch = engine_report(accelerator.distributed_type.name, accelerator.num_processes,
                                     requested_engine())
    say(engine)
    if mismatch and accelerator.is_main_process:
        log.warning(mismatch)
    problems = refuse_unsharded_work(accelerator.distributed_type.name, recipe.strategy.kind,
                                     bool(getattr(recipe.strategy, "text_encoder", False)), recipe.sample.every)
    if t.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # accelerate applies no fp16 autocast on a CPU, so a half base would meet fp32 inputs and fail
        problems.append("train.mixed_precision: fp16 needs a GPU; on a CPU set train.mixed_precision: bf16 (or no)")
    if problems:
        raise RecipeError(recipe.source, problems)
    # everything that can fail cheaply fails before the model loads; first, that nothing finished gets lost
    strategy = create_strategy(recipe.strategy)
    command = resume_command(recipe.source, recipe.overrides)
    earlier_run = check_output_dir(output_dir, output_dir / strategy.artifact_name, resume, overwrite,
                                   recipe.source, recipe.overrides)
    prepared = prepare_data(d, t.batch_size * accelerator.num_processes)
    examples, sizes = prepared.examples, prepared.sizes
    if prepared.bucket_report is not None:
        say(format_report(prepared.bucket_report))
        if accelerator.is_main_process:
            write_report(prepared.bucket_report, output_dir / "buckets.json")
    order = BatchOrder(len(examples), d.repeats, t.batch_size, accelerator.num_processes,
                       accelerator.process_index, t.seed, groups=prepared.groups,
                       example_repeats=[e.repeats for e in examples])
    # what the artifact's header says about the data (kohya's ss_num_train_images and ss_tag_frequency)
    data_figures = {"num_train_images": len(examples),
                    "tag_frequency": json.dumps({data_name(d.images, d.dataset): tag_frequency(
                        [e.caption for e in examples])}, sort_keys=True)}
    if resume and accelerator.is_main_process:
        checkpoint.remove_stale_temporaries(output_dir)
    resume_from = checkpoint.find_checkpoint(output_dir, resume) if resume else None
    if resume and resume_from is None:
        say(f"--resume latest: no checkpoint in {checkpoint.checkpoints_dir(output_dir)} yet; starting at step 0")
    if resume_from is not None:
        saved = load_for_resume(resume_from, recipe.source, recipe.overrides)
        for note in check_resumable(saved[0], recipe_to_dict(recipe), resume_from, recipe.source,
                                    recipe.overrides):
            say(f"resume: {note}")
    if earlier_run:
        accelerator.wait_for_everyone()  # every process has looked before the main one removes
        if accelerator.is_main_process:
            say(f"--overwrite: removing the earlier run's {', '.join(map(str, earlier_run))}")
            remove_earlier_run(earlier_run)
    first_step = saved[0]["step"] if resume_from is not None else 0

    family = family_for(recipe.model.family, recipe.model.base, hub=True)
    recipe.model = options_for(family.spec, recipe.model)  # a hub id's family, told only now
    if refusal(family.spec, recipe.strategy):
        raise RecipeError(recipe.source, [refusal(family.spec, recipe.strategy)])
    base_dtype = weight_dtype(recipe.model.dtype, t.mixed_precision)  # the frozen base's (trained weights: fp32)
    parts = family.load(recipe.model.base, revision=recipe.model.revision, variant=recipe.model.variant,
                        dtype=base_dtype, config=recipe.model.config, vae=recipe.model.vae, options=recipe.model)
    # the denoiser joins the device once the caches are filled and the encoders have left it: a Flux transformer
    # (24 GB in bf16) and its T5 (9.5 GB) are never there together; class images need it before
    # cache.text_encoders: one_at_a_time keeps them on the CPU; each comes only while it encodes
    one_by_one = [] if recipe.cache.text_encoders == "together" else list(parts.text_encoder_modules().values())
    for name, module in parts.modules.items():
        if name != parts.denoiser_name and not any(module is m for m in one_by_one):
            module.to(accelerator.device)
    parts.max_token_length = d.max_token_length
    if recipe.model.quantize != "none":
        count = quantize_weights(parts.denoiser, recipe.model.quantize)
        say(f"model.quantize: {count} Linear weights of the {parts.denoiser_name} in {recipe.model.quantize}")
    strategy.check(family, parts)  # options that cannot fit this model fail before any long work
    # the header keys AUTOMATIC1111 and Forge tell the base family by, in every artifact's header
    family_header = family_fields(family_version(family, parts), recipe.strategy.kind, recipe.model.base)
    tokenizer = family.text_encoders(parts)[0][1]
    caption_notes = caption_report(tokenizer, strategy.prompts([e.caption for e in examples], torch.Generator()),
                                   [e.name for e in examples], family.caption_window(tokenizer, d.max_token_length),
                                   strategy.kept_words())
    say("\n".join(caption_notes))
    class_count = recipe.prior.num_class_images if recipe.prior.mode == "class_images" else 0
    plan = plan_caches(recipe.cache.latents, recipe.cache.text, d.crop, recipe.strategy.changes_text_encoding(),
                       estimated_bytes(len(examples) + class_count, 2 if d.random_flip else 1, d.resolution,
                                       latent_channels_of(parts.vae.config) or 4,
                                       downsampling_of(parts.vae.config) or 8))
    for note in plan.notes:
        say(note)
    encoder = make_encoder(family, parts, plan, accelerator.device, recipe.cache.dir,
                           show_progress=accelerator.is_local_main_process)
    class_batches = None
    if recipe.prior.mode == "class_images":
        parts.denoiser.to(accelerator.device)
        with on_device(one_by_one, accelerator.device):  # the pipeline draws with every part on one device
            # drawn by the base as it is now, before the strategy changes anything
            class_batches = prior.class_image_stream(
                accelerator, family, parts, recipe.prior, recipe.model, d.resolution, t.batch_size, t.seed,
                start=first_step * t.gradient_accumulation_steps, num_workers=d.num_workers, encoder=encoder)
    with one_at_a_time(one_by_one, accelerator.device):
        latent_keys = encoder.cache_latents(examples, sizes, d.random_flip, "training images")
        encoder.cache_text([e.caption for e in examples] + [""] * (d.caption_dropout > 0)
                           + list(recipe.prior.class_prompt))
    offloaded = offload_idle(parts, encoder.latent_store is not None, encoder.text is not None,
                             accelerator.device) if recipe.cache.offload else []
    parts.denoiser.to(accelerator.device)
    torch.manual_seed(t.seed)  # new layers initialise from the recipe's seed, not from whatever ran before
    strategy.prepare(family, parts, keep_frozen_base=recipe.prior.mode == "base_prediction")
    trained = parts.trained()
    if t.gradient_checkpointing:
        enable_gradient_checkpointing(accelerator, parts, trained)
    if t.channels_last:
        parts.denoiser.to(memory_format=torch.channels_last)
    if t.compile:
        parts.denoiser.compile()  # in place: parameter names, and so saved files, stay as they are
    groups = strategy.parameter_groups(recipe.strategy.learning_rate or t.learning_rate)
    summary = plan_lines(Plan(
        images_per_folder=images_per_folder(trained_examples(prepared), d.repeats), max_steps=t.max_steps,
        batch_size=t.batch_size, processes=accelerator.num_processes, accumulation=t.gradient_accumulation_steps,
        batches_per_epoch=order.batches_per_epoch, trainable=strategy.state_dict(), device=str(accelerator.device),
        precision=f"mixed precision {t.mixed_precision}, frozen base in {str(base_dtype).removeprefix('torch.')}",
        base=recipe.model.base, output_dir=output_dir))
    say("\n".join(summary))
    optimizer = build_optimizer(groups, t.optimizer, (t.adam_beta1, t.adam_beta2), t.adam_weight_decay,
                                t.adam_epsilon)
    lr_scheduler = build_scheduler(optimizer, t.lr_scheduler, t.lr_warmup_steps, t.max_steps)
    prepared_modules, optimizer, params = prepare_for_training(accelerator, {n: parts.modules[n] for n in trained},
                                                               optimizer)
    parts.modules.update(prepared_modules)
    trained_modules = [accelerator.unwrap_model(m) for m in prepared_modules.values()]
    shards, not_sharded = sharding_report(accelerator.distributed_type.name, accelerator.num_processes,
                                          {n: local_fraction(m) for n, m in zip(trained, trained_modules)})
    say(shards)
    if not_sharded and accelerator.is_main_process:
        log.warning(not_sharded)
    save_checkpoint = partial(saves.save_checkpoint, accelerator, output_dir, strategy=strategy, optimizer=optimizer,
                              lr_scheduler=lr_scheduler, recipe=recipe, models=trained_modules)

    step = first_step
    if resume_from is not None:
        rates = saves.restore_checkpoint(accelerator, saved, step, strategy, optimizer, lr_scheduler,
                                         trained_modules)
        say(f"resumed from {resume_from} at step {step}; step {step + 1} trains at learning rate {rates[0]:g}")
    order.start = step * t.gradient_accumulation_steps
    loader = make_loader(ImageCaptionDataset(examples, sizes, d.crop, d.random_flip, d.caption_dropout,
                                             latent_keys), order, d.num_workers)
    if accelerator.is_main_process:
        trackers.start(accelerator, recipe.log.project, recipe.log.run_name, recipe_to_dict(recipe),
                       str(output_dir / "logs"))

    settings = LossSettings(
        objective=family.objective(parts, recipe.model),
        text_encoder_trains=False,
        prior_mode=recipe.prior.mode, prior_weight=recipe.prior.loss_weight,
        class_prompts=tuple(recipe.prior.class_prompt))
    live = LiveReport(accelerator, recipe, output_dir, step, summary, caption_notes)  # history.jsonl, report.html
    progress = progress_bar(total=t.max_steps, initial=step, desc="training", unit="step", dynamic_ncols=True,
                            disable=not accelerator.is_local_main_process)
    batches = iter(loader)
    recovery = divergence_advice(recipe)  # what a NaN loss tells the user to run
    with interrupt.stop_on_signals() as stop, progress, live:  # the bar closes before any message that stops the run
        while step < t.max_steps:
            live.start_step()
            losses = []
            lr = float(optimizer.param_groups[0]["lr"])  # what this step's optimizer.step() uses: logged for it
            # a strategy may stop training the text encoders part-way (DreamBooth's text_encoder_steps)
            settings = dataclasses.replace(settings, text_encoder_trains=any(
                p.requires_grad for module in parts.text_encoder_modules().values() for p in module.parameters()))
            for micro in range(t.gradient_accumulation_steps):
                batch = next(batches)
                class_batch = next(class_batches) if class_batches is not None else None
                seed = step_seed(t.seed, step, micro, accelerator.process_index)
                torch.manual_seed(seed)  # dropout and anything else drawing from the global generator
                with accelerator.accumulate(*[parts.modules[name] for name in trained]):
                    loss = micro_step_loss(family, parts, strategy, batch, class_batch,
                                           torch.Generator().manual_seed(seed), settings, encoder)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and t.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, t.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                losses.append(loss.detach())
            lr_scheduler.step()
            strategy.on_step_end(step + 1)
            step += 1
            mean_loss = accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()
            # the same reduced value on every process, so all of them stop together
            check_finite_loss(mean_loss, step, output_dir, recovery)
            if on_step is not None:
                on_step(step)
            # drawn by update, which keeps to the bar's pace (without a terminal, a line every 30 s)
            progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            progress.update(1)
            saved = recipe.checkpoint.every and step % recipe.checkpoint.every == 0 and step < t.max_steps
            live.record(step, mean_loss, lr, checkpoint=bool(saved))
            if step % recipe.log.every == 0:
                accelerator.log({"loss": mean_loss, "lr": lr}, step=step)
            if saved:
                save_checkpoint(step=step)
            # asked to stop: no snapshot and no sample grid at this step (a grid can take longer than the step)
            stopping = stop.requested_anywhere(accelerator)
            snapshot_every = recipe.checkpoint.snapshot_every
            if snapshot_every and step % snapshot_every == 0 and step < t.max_steps and not stopping:
                saves.save_artifact(accelerator, strategy, recipe, output_dir / "snapshots" / f"step-{step:06d}",
                                    step, data_figures, output_dir, family_header)
            if recipe.sample.every and step % recipe.sample.every == 0 and not stopping:
                with on_device(offloaded, accelerator.device):
                    saves.save_samples(accelerator, family, parts, recipe, output_dir, step, strategy, base_dtype)
                live.sampled(step)
            if step < t.max_steps and stopping:
                if not saved:
                    save_checkpoint(step=step)
                raise interrupt.Interrupted(
                    f"stopped on {signal.Signals(stop.signum or signal.SIGINT).name} after step {step} of "
                    f"{t.max_steps}; the checkpoint is in {checkpoint.checkpoints_dir(output_dir)}. Continue with:\n"
                    f"  {command}", stop.signum or signal.SIGINT)

    artifact = saves.save_artifact(accelerator, strategy, recipe, output_dir, step, data_figures, output_dir,
                                   family_header)
    live.finish()  # the page's last version, before the list of what was written (which names it)
    if accelerator.is_main_process:
        say("wrote:\n" + "\n".join(written_lines(output_dir, started_at)))
    return artifact

