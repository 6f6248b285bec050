"""Checks across fields and against the file system: everything that can be known without loading a model."""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from finetune.models import DEFAULT_FAMILY, spec_of
from finetune.models.family import FamilySpec, refusal
from finetune.models.detect import UnsupportedFamily, family_of
from finetune.models.pipeline_folder import vae_downsampling
from finetune.file_errors import FileProblem, can_write_in, nearest_existing
from finetune.recipe import option_checks
from finetune.recipe.schema import Recipe
from finetune.recipe.writable import cache_folder_problems

# "owner/name" or "name" as the Hugging Face hub spells repository ids
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


def looks_like_local_path(value: str) -> bool:
    return (
        value.startswith((".", "/", "~"))
        or value.lower().endswith(CHECKPOINT_SUFFIXES)
        or os.sep in value.rstrip(os.sep).split(os.sep, 1)[-1]  # more than one separator: not owner/name
        or not _HUB_ID.match(value)
    )


def check(recipe: Recipe) -> list[str]:
    problems: list[str] = []
    problems += _check_model(recipe)
    problems += _check_data(recipe)
    problems += option_checks.check_masks(recipe)
    problems += option_checks.check_control(recipe)
    problems += _check_train(recipe)
    problems += option_checks.check_offload(recipe)
    problems += option_checks.check_optimizers(recipe)
    problems += option_checks.check_ema(recipe)
    problems += _check_prior(recipe)
    problems += _check_cache(recipe)
    problems += cache_folder_problems(recipe)
    problems += _check_outputs(recipe)
    problems += option_checks.check_validation(recipe)
    problems += option_checks.check_prompts(recipe)
    validate = getattr(recipe.strategy, "validate", None)
    if validate is not None:
        problems += validate(recipe)
    return problems


def _check_model(recipe: Recipe) -> list[str]:
    problems = []
    m = recipe.model
    if m.base is None:
        return problems  # already reported as missing
    base = os.path.expanduser(m.base)
    if os.path.exists(base):
        if os.path.isdir(base) and not os.path.isfile(os.path.join(base, "model_index.json")):
            problems.append(
                f"model.base: {m.base} is a folder but not a diffusers pipeline (no model_index.json); "
                "point it at a folder saved by `pipe.save_pretrained`, a hub id, or a single checkpoint file"
            )
        if os.path.isfile(base) and not base.lower().endswith(CHECKPOINT_SUFFIXES):
            problems.append(
                f"model.base: {m.base} is a file but not a checkpoint "
                f"(expected one of {', '.join(CHECKPOINT_SUFFIXES)})"
            )
    elif looks_like_local_path(m.base):
        problems.append(
            f"model.base: {m.base} does not exist; give an existing diffusers folder, a single checkpoint file, "
            "or a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5"
        )
    try:
        found = family_of(m.base)  # an SD3 or Flux base is named here, not met as a TypeError inside diffusers
    except UnsupportedFamily as exc:
        problems.append(str(exc))
    except FileProblem as exc:  # a single-file base cut short: its header says so
        problems.append(f"model.base: {exc}")
    else:
        chosen = spec_of(m.family if m.family != "auto" else found or DEFAULT_FAMILY)
        problems += m.problems()  # the family's own options (its objective's included)
        problems += [refused for refused in [refusal(chosen, recipe.strategy)] if refused]
        problems += missing_modules(chosen)
        if m.quantize != "none" and recipe.strategy.trains_base_weights:
            held = "frozen, multiplied in 8 bits" if m.quantize.endswith("_w8a8") else "in 8 bits"
            problems.append(f"model.quantize: {m.quantize} keeps the denoiser's weights {held}, and DreamBooth "
                            "trains those weights; set model.quantize: none, or train a LoRA")
        if m.quantize != "none" and importlib.util.find_spec("torchao") is None:
            problems.append(f"model.quantize: {m.quantize} needs torchao: pip install torchao "
                            "(or pip install 'finetune[quantize]')")
        if recipe.data.max_token_length and not chosen.long_prompts:
            problems.append(f"data.max_token_length: long-prompt chunking is for CLIP-only families; {chosen.title} "
                            "reads longer captions through its own text encoder; remove it")
        if found and m.family not in ("auto", found):
            problems.append(f"model.family: {m.family}, but {m.base} is a {spec_of(found).title} model (told from "
                            f"its {'model_index.json' if os.path.isdir(os.path.expanduser(m.base)) else 'keys'}); "
                            f"set model.family: {found} or auto")
    if m.vae and looks_like_local_path(m.vae) and not os.path.exists(os.path.expanduser(m.vae)):
        problems.append(f"model.vae: {m.vae} does not exist; give a folder holding a VAE (its config.json), a "
                        "pipeline folder, a single .safetensors file, or a hub id such as stabilityai/sd-vae-ft-mse")
    if m.config and looks_like_local_path(m.config) and not os.path.exists(os.path.expanduser(m.config)):
        problems.append(f"model.config: {m.config} does not exist")
    mp = recipe.train.mixed_precision
    if m.dtype in ("fp16", "bf16") and mp != m.dtype:
        problems.append(
            f"model.dtype: a {m.dtype} base needs train.mixed_precision: {m.dtype} (now {mp!r}); "
            "set both, or leave model.dtype at auto"
        )
    return problems


def _check_data(recipe: Recipe) -> list[str]:
    problems = []
    d = recipe.data
    if (d.images is None) == (d.dataset is None):
        problems.append("data: give exactly one of data.images (a folder) or data.dataset (a datasets name or folder)")
    if d.images is not None and not Path(os.path.expanduser(d.images)).is_dir():
        problems.append(f"data.images: {d.images} is not an existing folder")
    if d.dataset is not None and looks_like_local_path(d.dataset) and not os.path.exists(d.dataset):
        problems.append(f"data.dataset: {d.dataset} does not exist")
    known = vae_downsampling(recipe.model.base)
    factor = known or 8
    if d.resolution < factor or d.resolution % factor:
        why = (f"this base's VAE downsamples by {factor}" if known else
               "Stable Diffusion's VAE downsamples by 8; the base's own is read when it loads")
        problems.append(f"data.resolution: {d.resolution} must be a positive multiple of {factor} ({why}); "
                        f"try {max(factor, round(d.resolution / factor) * factor)}")
    if d.bucketing or d.buckets:
        problems += _check_buckets(d)
        if recipe.prior.mode == "class_images":
            problems.append("data.bucketing: class images are square and share each batch with the instance "
                            "images, which buckets make any shape; use prior.mode: base_prediction with buckets, "
                            "or turn bucketing off")
    if not d.caption_extension.startswith("."):
        problems.append(f"data.caption_extension: should start with a dot, e.g. '.txt' (got {d.caption_extension!r})")
    return problems


def _check_buckets(d) -> list[str]:
    from finetune.data.buckets import default_grid, derive_buckets

    problems = []
    for bucket in d.buckets:
        if len(bucket) != 2 or any(side < 8 or side % 8 for side in bucket):
            problems.append(f"data.buckets: {bucket} should be [width, height], each a positive multiple of 8")
    if not d.buckets:
        step, min_side, max_side = default_grid(d.resolution, d.bucket_step, d.bucket_min_side, d.bucket_max_side)
        if step < 8 or step % 8:
            problems.append(f"data.bucket_step: must be a positive multiple of 8 (64 is usual), got {step}")
        elif not 8 <= min_side <= max_side:
            problems.append(f"data.bucket_min_side/bucket_max_side: need 8 <= min <= max, got {min_side}, {max_side}")
        elif not derive_buckets(d.resolution ** 2, step, min_side, max_side):
            problems.append(
                f"data.bucket_min_side: {min_side} leaves no bucket: a side of at least {min_side} needs an area "
                f"of {min_side * min_side}, more than data.resolution {d.resolution} squared allows; lower "
                f"data.bucket_min_side to {d.resolution // step * step} or less (or leave it unset to follow the "
                "resolution), or raise data.resolution")
    return problems


def _check_cache(recipe: Recipe) -> list[str]:
    """Cache settings that would train on something other than what the recipe says are refused here; "auto"
    turns such a cache off with a message instead (finetune/data/caches.py)."""
    from finetune.data.caches import latent_cache_conflict

    problems = []
    c = recipe.cache
    conflict = latent_cache_conflict(recipe.data.crop)
    if c.latents in ("memory", "disk") and conflict:
        problems.append(f"cache.latents: {c.latents} cannot be right: {conflict}. "
                        "Set cache.latents: auto or off, or data.crop: center")
    change = recipe.strategy.changes_text_encoding() if recipe.strategy.kind else None
    if c.text == "on" and change:
        problems.append(f"cache.text: on cannot be right: {change}, so a caption's encoding changes as it "
                        "trains. Set cache.text: auto or off")
    if c.text_encoders == "one_at_a_time" and (c.text == "off" or change):
        why = "cache.text: off" if c.text == "off" else change
        problems.append(f"cache.text_encoders: one_at_a_time brings each text encoder to the accelerator only while "
                        f"the text cache fills, but the text is not cached ({why}) and every step needs them "
                        "all; set cache.text_encoders: together")
    if c.dir is not None and Path(os.path.expanduser(c.dir)).is_file():
        problems.append(f"cache.dir: {c.dir} is a file; choose a folder")
    return problems


def _check_train(recipe: Recipe) -> list[str]:
    problems = []
    t = recipe.train
    if t.lr_warmup_steps > t.max_steps:  # at least 0: declared on the key (schema.py)
        problems.append(f"train.lr_warmup_steps: must be between 0 and train.max_steps ({t.max_steps}), "
                        f"got {t.lr_warmup_steps}")
    return problems


def _check_prior(recipe: Recipe) -> list[str]:
    p = recipe.prior
    if p.mode == "none":
        return []
    problems = []
    if not [prompt for prompt in p.class_prompt if prompt.strip()]:
        problems.append(f"prior.class_prompt: prior.mode {p.mode} needs the class the instances belong to, "
                        "e.g. class_prompt: \"a photo of a dog\" (or a list of prompts)")
    if p.mode == "class_images":
        if p.num_class_images < recipe.train.batch_size:
            problems.append(f"prior.num_class_images: {p.num_class_images} is fewer than one batch "
                            f"(train.batch_size {recipe.train.batch_size}); every batch holds as many class as "
                            "instance samples, so ask for at least that many")
        if p.class_data_dir is not None:
            folder = Path(os.path.expanduser(p.class_data_dir))
            if folder.exists() and not folder.is_dir():
                problems.append(f"prior.class_data_dir: {p.class_data_dir} is a file; choose a folder")
    return problems


def _check_outputs(recipe: Recipe) -> list[str]:
    problems = []
    s = recipe.sample
    if s.every > 0 and not s.prompts and not s.prompt_file:
        problems.append("sample.every is set but sample.prompts is empty: add prompts (or a sample.prompt_file) or "
                        "set sample.every: 0")
    if recipe.output_dir is None:
        return problems
    out = Path(os.path.expanduser(recipe.output_dir))
    if out.exists() and not out.is_dir():
        problems.append(f"output_dir: {recipe.output_dir} exists and is a file; choose a folder")
    else:
        parent = nearest_existing(out)  # where making output_dir would start (a file there cannot hold it either)
        if not can_write_in(parent):
            problems.append(f"output_dir: {parent} is not writable; choose a folder you can write to")
    return problems


def missing_modules(spec: FamilySpec) -> list[str]:
    """One problem per module in `spec.needs` that does not import, naming what the family needs it for."""
    problems = []
    for module, why in spec.needs.items():
        try:
            importlib.import_module(module)
        except Exception as exc:  # not installed, or built for another torch (ImportError, RuntimeError)
            problems.append(f"model.family: {spec.title} needs {module} ({why}), which does not import here "
                            f"({type(exc).__name__}: {str(exc)[:120]}); install the {module} release built for the torch you "
                            "have (from the index your torch came from)")
    return problems
