"""A training run set up: `setup` does everything before the first step and returns a `Run` (training/run_state.py),
what the steps need.

Order of work: check the engine, data and checkpoint (cheap, can fail) -> load the frozen base -> class images for
prior preservation (drawn by the untouched base) -> fill the caches -> let the strategy inject what trains ->
optimizer, schedule and the accelerator's preparation. training/loop.py goes on from there.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from finetune.console import ensure_configured
from finetune.data import BatchOrder, ImageCaptionDataset, make_loader
from finetune.data.buckets import format_report, write_report
from finetune.data.caches import estimated_bytes, plan_caches
from finetune.data.masks import summary_line as mask_line
from finetune.data.captions import caption_report
from finetune.data.control import slot_problem, slots_of, summary_line as control_line
from finetune.data.prepare import held_out_fraction, prepare_data, trained_examples
from finetune.data.sources import data_name, tag_frequency
from finetune.export.family_header import family_fields, family_version
from finetune.models import Components, ModelFamily, family_for
from finetune.models.family import refusal
from finetune.models.pipeline_folder import downsampling_of, latent_channels_of
from finetune.models.quantize import quantize_weights, summary_line
from finetune.recipe.load import RecipeError, options_for, recipe_to_dict
from finetune.recipe.schema import Recipe
from finetune.strategies import create_strategy
from finetune.training import block_offload, checkpoint, ema, optimizers, prior
from finetune.training import compile as compiling
from finetune.training.engine import (enable_gradient_checkpointing, has_accelerator, prepare_for_training,
                                      sharding_report)
from finetune.training.failures import divergence_advice
from finetune.training.inputs import make_encoder
from finetune.training.offload import offload_idle, on_device, one_at_a_time
from finetune.training.preflight import check_engine_and_device
from finetune.training.optim import build_optimizer, build_scheduler, schedule_for
from finetune.training.resume import checkpoint_to_resume, check_output_dir, remove_earlier_run, resume_command
from finetune.training.control_images import control_problems
from finetune.training.sample_prompts import prompts_for_run
from finetune.training.saves import Saving
from finetune.distributed import local_fraction
from finetune.training.step import LossSettings
from finetune.training.summary import Plan, images_per_folder, plan_lines
from finetune.training.grid_scores import load_grid_scorer
from finetune.training.validation import prepare_validation
from finetune.training.run_state import Run, Schedule, _say, close

log = logging.getLogger(__name__)  # the toolkit's own messages: finetune/console.py styles them
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def weight_dtype(model_dtype: str, mixed_precision: str) -> torch.dtype:
    """dtype of the frozen base: as asked, or following mixed precision when "auto"."""
    if model_dtype == "auto":
        return DTYPES.get(mixed_precision, torch.float32)
    return DTYPES[model_dtype]


def setup(recipe: Recipe, family: ModelFamily | None = None, *, resume: str | None = None,
          overwrite: bool = False) -> Run:
    """Everything before the first step. `family`: the model family to load the base with (None: the one
    recipe.model names or detection finds); `resume`: "latest" or a checkpoint folder, read and checked here,
    before any model loads (loop.resume puts its state back); `overwrite`: start anew over a finished run
    (training/resume.py). The accelerator is closed when setup fails; use the Run as a context manager."""
    ensure_configured()
    output_dir = Path(recipe.output_dir).expanduser()
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    accelerator = Accelerator(
        cpu=not has_accelerator(),  # accelerate only runs multi-process CPU jobs (torchrun) when told cpu=True
        mixed_precision=recipe.train.mixed_precision,
        gradient_accumulation_steps=recipe.train.gradient_accumulation_steps, log_with=recipe.log.to or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")))
    try:
        return _setup(accelerator, recipe, family, output_dir, resume, overwrite)
    except BaseException:
        close(accelerator)
        raise


def _setup(accelerator, recipe: Recipe, family: ModelFamily | None, output_dir: Path, resume: str | None,
           overwrite: bool) -> Run:
    def say(text: str | None) -> None:
        _say(accelerator, text)

    t, d = recipe.train, recipe.data
    started_at = time.time() - 1  # file times may be rounded down to the second
    attention = check_engine_and_device(accelerator, recipe, weight_dtype(recipe.model.dtype, t.mixed_precision),
                                        say)
    # everything that can fail cheaply fails before the model loads; first, that nothing finished gets lost
    strategy = create_strategy(recipe.strategy)
    command = resume_command(recipe.source, recipe.overrides)
    earlier_run = check_output_dir(output_dir, output_dir / strategy.artifact_name, resume, overwrite,
                                   recipe.source, recipe.overrides)
    prepared = prepare_data(d, t.batch_size * accelerator.num_processes, held_out_fraction=held_out_fraction(
        recipe.validation.images), held_out_seed=recipe.validation.seed)
    examples, sizes = prepared.examples, prepared.sizes
    grid_scorer = load_grid_scorer(recipe.validation.clip_model, recipe.validation.dino_model,
                                   trained_examples(prepared), accelerator.device, recipe.source)
    sharded = accelerator.distributed_type.name in ("FSDP", "DEEPSPEED")
    compile_mode = "off" if t.offload else compiling.resolve(t.compile, accelerator.device.type, sharded=sharded)
    shapes = len(set(zip(sizes, prepared.control_sizes or sizes)))  # a batch's shape: its target and control sizes
    if cannot := compiling.problems(compile_mode, accelerator.device.type, shapes):
        raise RecipeError(recipe.source, cannot)
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
    resume_from, saved, notes = checkpoint_to_resume(output_dir, resume, recipe_to_dict(recipe), recipe.source,
                                                     recipe.overrides)
    for note in notes:
        say(note)
    if earlier_run:
        accelerator.wait_for_everyone()  # every process has looked before the main one removes
        if accelerator.is_main_process:
            say(f"--overwrite: removing the earlier run's {', '.join(map(str, earlier_run))}")
            remove_earlier_run(earlier_run)
    first_step = saved[0]["step"] if resume_from is not None else 0
    order.start = first_step * t.gradient_accumulation_steps  # the data stream goes on where the run stopped

    if family is None:
        family = family_for(recipe.model.family, recipe.model.base, hub=True)
    recipe.model = options_for(family.spec, recipe.model)  # a hub id's family, told only now
    if refusal(family.spec, recipe.strategy):
        raise RecipeError(recipe.source, [refusal(family.spec, recipe.strategy)])
    if d.control is not None and (too_many := slot_problem(slots_of(examples), family.spec)):
        raise RecipeError(recipe.source, [too_many])  # a hub base's family is known only now; no model loaded yet
    if control_problems(recipe, family):  # a hub id's family is told only now: before its base loads
        raise RecipeError(recipe.source, control_problems(recipe, family))
    base_dtype = weight_dtype(recipe.model.dtype, t.mixed_precision)  # the frozen base's (trained weights: fp32)
    parts, one_by_one = _load_base(accelerator, family, recipe, base_dtype)
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
                       estimated_bytes(len(examples) * (1 + slots_of(examples)) + class_count,
                                       2 if d.random_flip else 1, d.resolution,
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
                accelerator, prior.class_image_spec(recipe.prior, recipe.model, d.resolution), recipe.prior,
                lambda: family.pipeline(parts), order, d.num_workers, encoder)
    with one_at_a_time(one_by_one, accelerator.device):
        latent_keys = encoder.cache_latents(examples, sizes, d.random_flip, "training images")
        control_keys = encoder.cache_controls(examples, sizes, prepared.control_sizes, _resize(d), d.random_flip)
        encoder.cache_text([e.caption for e in examples] + [""] * (d.caption_dropout > 0)
                           + list(recipe.prior.class_prompt))
        objective = family.objective(parts, recipe.model)
        validation = prepare_validation(recipe.validation, d, prepared.held_out, family, parts, objective, encoder,
                                        strategy, accelerator.device, t.batch_size, t.max_steps)
    offloaded = offload_idle(parts, encoder.latent_store is not None, encoder.text is not None,
                             accelerator.device) if recipe.cache.offload else []
    streamed = block_offload.plan(parts.denoiser, family.spec, t.offload, accelerator.distributed_type.name,
                                  recipe.source)
    with block_offload.held_back(streamed.blocks):  # their frozen weights stay on the CPU
        parts.denoiser.to(accelerator.device)
    torch.manual_seed(t.seed)  # new layers initialise from the recipe's seed, not from whatever ran before
    strategy.prepare(family, parts, keep_frozen_base=recipe.prior.mode == "base_prediction")
    trained = parts.trained()
    if t.gradient_checkpointing:
        enable_gradient_checkpointing(accelerator, parts, trained)
    if t.channels_last:
        parts.denoiser.to(memory_format=torch.channels_last)
    offload_line = block_offload.start(parts.denoiser, streamed, accelerator.device)  # in the summary below
    say(compiling.compile_for_training(parts.denoiser, compile_mode, family.spec.compile_blocks))
    groups = strategy.parameter_groups(recipe.strategy.learning_rate or t.learning_rate)
    summary = plan_lines(Plan(
        images_per_folder=images_per_folder(trained_examples(prepared), d.repeats), max_steps=t.max_steps,
        batch_size=t.batch_size, processes=accelerator.num_processes, accumulation=t.gradient_accumulation_steps,
        batches_per_epoch=order.batches_per_epoch, trainable=strategy.state_dict(), device=str(accelerator.device),
        precision=f"mixed precision {t.mixed_precision}, frozen base in {str(base_dtype).removeprefix('torch.')}",
        base=recipe.model.base, output_dir=output_dir))
    optimizer_line = optimizers.summary_line(t.optimizer, t.optimizer_args, groups[0]["lr"], t.lr_scheduler,
                                             t.lr_warmup_steps)
    option_lines = (mask_line(d.masks, d.unmasked_weight), control_line(trained_examples(prepared), d.control),
                    optimizer_line, offload_line)
    summary += [x.summary for x in (validation, grid_scorer) if x] + [line for line in option_lines if line]
    summary += ema.plan_line(t.ema, t.max_steps)
    say("\n".join(summary))
    say(attention.line)
    sample_rows = prompts_for_run(recipe, downsampling_of(parts.vae.config), say)
    optimizer = build_optimizer(groups, t.optimizer, (t.adam_beta1, t.adam_beta2), t.adam_weight_decay, t.adam_epsilon,
                                accelerator.device.type, t.optimizer_args, t.lr_warmup_steps)
    lr_scheduler = build_scheduler(optimizer, *schedule_for(t.optimizer, t.optimizer_args, t.lr_scheduler,
                                                            t.lr_warmup_steps, t.max_steps))
    with block_offload.held_back(streamed.blocks):  # accelerate's prepare moves the model to the device
        prepared_modules, optimizer, params = prepare_for_training(accelerator,
                                                                   {n: parts.modules[n] for n in trained}, optimizer)
    parts.modules.update(prepared_modules)
    average = ema.start(t.ema, optimizer, accelerator)
    trained_modules = [accelerator.unwrap_model(m) for m in prepared_modules.values()]
    shards, not_sharded = sharding_report(accelerator.distributed_type.name, accelerator.num_processes,
                                          {n: local_fraction(m) for n, m in zip(trained, trained_modules)})
    say(shards)
    if not_sharded and accelerator.is_main_process:
        log.warning(not_sharded)

    resolved = recipe_to_dict(recipe)  # as every checkpoint and artifact header keeps it
    return Run(
        accelerator=accelerator, family=family, parts=parts, strategy=strategy, optimizer=optimizer,
        lr_scheduler=lr_scheduler, params=params, trained=trained, trained_modules=trained_modules,
        encoder=encoder, class_batches=class_batches,
        loader=make_loader(ImageCaptionDataset(examples, sizes, d.crop, d.random_flip, d.caption_dropout,
                                               latent_keys, prepared.control_sizes, _resize(d), control_keys),
                           order, d.num_workers,
                           pin_memory=accelerator.device.type == "cuda"),
        settings=LossSettings(objective=objective, text_encoder_trains=False,
                              prior_mode=recipe.prior.mode, prior_weight=recipe.prior.loss_weight,
                              class_prompts=tuple(recipe.prior.class_prompt), unmasked_weight=d.unmasked_weight),
        schedule=Schedule(max_steps=t.max_steps, accumulation=t.gradient_accumulation_steps, seed=t.seed,
                          max_grad_norm=t.max_grad_norm, checkpoint_every=recipe.checkpoint.every,
                          snapshot_every=recipe.checkpoint.snapshot_every, sample_every=recipe.sample.every,
                          log_every=recipe.log.every, sample=recipe.sample, resolution=d.resolution,
                          sample_rows=sample_rows),
        saving=Saving(output_dir=output_dir, command=command, recovery=divergence_advice(recipe), recipe=resolved,
                      keep=recipe.checkpoint.keep, base_model=recipe.model.base, kind=recipe.strategy.kind,
                      data_figures=data_figures, family_header=family_header),
        offloaded=offloaded, base_dtype=base_dtype, started_at=started_at, summary=summary,
        caption_notes=caption_notes, recipe=recipe, attention=attention, step=first_step, resume_from=resume_from,
        saved=saved, validation=validation, ema=average, grid_scorer=grid_scorer,
        weight_views=optimizers.weight_views(t.optimizer, optimizer) + ([average.shown] if average else []))


def _resize(d) -> str:
    """data.control.resize ("target" without data.control: nothing to resize)."""
    return d.control.resize if d.control is not None else "target"


def _load_base(accelerator, family: ModelFamily, recipe: Recipe,
               base_dtype: torch.dtype) -> tuple[Components, list[torch.nn.Module]]:
    """The frozen base, on the accelerator except the denoiser and (cache.text_encoders: one_at_a_time) the text
    encoders, which are returned to come one at a time."""
    parts = family.load(recipe.model.base, revision=recipe.model.revision, variant=recipe.model.variant,
                        dtype=base_dtype, config=recipe.model.config, vae=recipe.model.vae, options=recipe.model)
    # the denoiser joins the device once the caches are filled and the encoders have left it: a Flux transformer
    # (24 GB in bf16) and its T5 (9.5 GB) are never there together; class images need it before
    # cache.text_encoders: one_at_a_time keeps them on the CPU; each comes only while it encodes
    one_by_one = [] if recipe.cache.text_encoders == "together" else list(parts.text_encoder_modules().values())
    for name, module in parts.modules.items():
        if name != parts.denoiser_name and not any(module is m for m in one_by_one):
            module.to(accelerator.device)
    parts.max_token_length = recipe.data.max_token_length
    if recipe.model.quantize != "none":
        count = quantize_weights(parts.denoiser, recipe.model.quantize)
        _say(accelerator, summary_line(recipe.model.quantize, count, parts.denoiser_name))
    return parts, one_by_one
