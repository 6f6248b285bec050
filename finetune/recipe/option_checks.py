"""Checks of the training options issue 36 added (validation score, grid scores, masks, block offload, optimizers,
EMA, per-prompt samples) and of issue 38's control images, each by the module that knows the option;
`recipe/checks.py` calls them."""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

from finetune.models import DEFAULT_FAMILY, spec_of
from finetune.models.detect import UnsupportedFamily, family_of
from finetune.models.pipeline_folder import vae_downsampling
from finetune.file_errors import FileProblem
from finetune.recipe.schema import Recipe

# "owner/name" or "name" as the Hugging Face hub spells repository ids
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


def check_validation(recipe: Recipe) -> list[str]:
    """validation: a fraction in (0, 1) or a folder apart from data.images; how many images a fraction holds out
    is checked with the data (data/prepare.py: split_held_out)."""
    from finetune.data.prepare import held_out_fraction

    v, problems = recipe.validation, check_grid_scores(recipe)
    if v.images is None:
        if v.every:
            problems.append("validation.every: set, but validation.images is not: give a folder of held-out images "
                            "or a fraction of the training images to hold out, e.g. validation.images: 0.1")
        return problems
    fraction = held_out_fraction(v.images)
    if fraction is not None:
        if not 0 < fraction < 1:
            problems.append(f"validation.images: a fraction of the training images to hold out must lie between 0 "
                            f"and 1 (0.1 is usual), got {v.images}; or give a folder of held-out images")
        return problems
    folder = Path(os.path.expanduser(v.images)).resolve()
    if not folder.is_dir():
        problems.append(f"validation.images: {v.images} is neither an existing folder of held-out images nor a "
                        "fraction such as 0.1")
    elif recipe.data.images is not None:
        trained = Path(os.path.expanduser(recipe.data.images)).resolve()
        if folder == trained or trained in folder.parents:
            problems.append(f"validation.images: {v.images} lies in data.images ({recipe.data.images}), whose "
                            "subfolders are trained on too; move the held-out images out of it, or give a fraction")
    return problems


def check_grid_scores(recipe: Recipe) -> list[str]:
    """validation.clip_model / dino_model: an existing folder where a local path is given (a hub id is looked up at
    setup), and sample grids to score."""
    from finetune.recipe.checks import looks_like_local_path  # checks.py imports this module

    problems = []
    for key, example in (("clip_model", "openai/clip-vit-base-patch32"), ("dino_model", "facebook/dinov2-small")):
        name = getattr(recipe.validation, key)
        if name is None:
            continue
        if looks_like_local_path(name) and not os.path.isdir(os.path.expanduser(name)):
            problems.append(f"validation.{key}: {name} is not an existing folder; give a model folder saved with "
                            f"save_pretrained, or a hub id such as {example}")
        if not recipe.sample.every:
            problems.append(f"validation.{key}: scores the sample grids, and sample.every is 0 (no grid is drawn); "
                            f"set sample.every (and sample.prompts), or remove validation.{key}")
    return problems


def check_masks(recipe: Recipe) -> list[str]:
    """data.masks and data.unmasked_weight; each image's own mask is checked with the images (data/masks.py)."""
    d = recipe.data
    problems = []
    if d.masks is None:
        return problems
    if d.dataset is not None:
        problems.append("data.masks: masks are read beside an image folder (data.images), not from a dataset's "
                        "columns; save the dataset's images to a folder, or remove data.masks")
    elif d.masks != "alpha":
        folder = Path(os.path.expanduser(d.masks))
        if not folder.is_dir():
            problems.append(f"data.masks: {d.masks} is not an existing folder; give a folder of mask images named "
                            "as the training images, or alpha to use each image's alpha channel")
        elif d.images is not None and folder.resolve().is_relative_to(Path(os.path.expanduser(d.images)).resolve()):
            problems.append(f"data.masks: {d.masks} lies inside data.images, so its masks would train as images; "
                            "move it beside the image folder")
    return problems


def check_control(recipe: Recipe) -> list[str]:
    """data.control against the rest of the recipe (each pair is checked with the images: data/control.py): one
    source, folders that exist outside data.images, the family an edit family, and nothing that would treat a
    target and its control images apart (random crops, class images, a validation folder without controls)."""
    from finetune.data.control import slot_problem
    from finetune.models import family_told

    d, c = recipe.data, recipe.data.control
    if c is None:
        return []
    problems = []
    if bool(c.folders) == (c.column is not None):
        problems.append("data.control: give exactly one of folders (folders of control images named as the training "
                        "images) or column (a metadata.jsonl field or dataset column, e.g. control_image)")
    if c.folders and d.dataset is not None:
        problems.append("data.control.folders: control folders are matched by file name to an image folder "
                        "(data.images), not to a dataset; use data.control.column (a column of the dataset)")
    for folder in c.folders:
        path = Path(os.path.expanduser(folder))
        if not path.is_dir():
            problems.append(f"data.control.folders: {folder} is not an existing folder of control images")
        elif d.images is not None and path.resolve().is_relative_to(Path(os.path.expanduser(d.images)).resolve()):
            problems.append(f"data.control.folders: {folder} lies inside data.images, so its control images would "
                            "train as targets; move it beside the image folder")
    if c.column is not None and d.images is not None and not (Path(os.path.expanduser(d.images)) /
                                                             "metadata.jsonl").is_file():
        problems.append(f"data.control.column: {c.column!r} is read from data.images' metadata.jsonl, and "
                        f"{d.images} has none; write one (file_name, text, {c.column}), or use data.control.folders")
    if c.resize == "target" and c.resolution is not None:
        problems.append("data.control.resolution: control images take their target's size with resize: target; "
                        "remove data.control.resolution, or set data.control.resize: bucket")
    elif c.resolution is not None and c.resolution % (vae_downsampling(recipe.model.base) or 8):
        factor = vae_downsampling(recipe.model.base) or 8
        problems.append(f"data.control.resolution: {c.resolution} must be a multiple of {factor} (the VAE's "
                        f"downsampling); try {max(factor, round(c.resolution / factor) * factor)}")
    if c.resize == "bucket" and not problems and not _control_grid(d):
        problems.append(f"data.control.resolution: no bucket of the grid (data.bucket_step, data.bucket_min_side, "
                        f"data.bucket_max_side) fits {c.resolution or d.resolution} px squared; raise "
                        "data.control.resolution, or lower data.bucket_min_side")
    if d.crop == "random":
        problems.append("data.crop: random would cut a target and its control images differently; use data.crop: "
                        "center with data.control")
    if recipe.prior.mode == "class_images":
        problems.append("prior.mode: class_images draws class images, which have no control images; with "
                        "data.control use prior.mode: base_prediction (the instances' own control images) or none")
    if recipe.validation.images is not None and _is_folder_option(recipe.validation.images):
        problems.append(f"validation.images: the held-out images in {recipe.validation.images} have no control "
                        "images; with data.control hold out a fraction of the training images instead (e.g. "
                        "validation.images: 0.1), which keep theirs")
    family = family_told(recipe.model.family, recipe.model.base)
    if family is not None and family.spec.control_images == 0:
        problems.append(slot_problem(None, family.spec))
    return problems


def _control_grid(d) -> list:
    from finetune.data.control_sizes import control_buckets

    try:
        return control_buckets(d)
    except (ValueError, ZeroDivisionError):  # a grid the bucket checks refuse by name
        return [None]


def _is_folder_option(images) -> bool:
    from finetune.data.prepare import held_out_fraction

    return held_out_fraction(images) is None


def check_offload(recipe: Recipe) -> list[str]:
    """train.offload against the family, the strategy, checkpointing, compiling and the engine asked for."""
    from finetune.training.block_offload import problems
    from finetune.training.engine import requested_engine

    t = recipe.train
    if t.offload is None or recipe.model.base is None:
        return []
    try:
        spec = spec_of(recipe.model.family if recipe.model.family != "auto" else
                       family_of(recipe.model.base) or DEFAULT_FAMILY)
    except (UnsupportedFamily, FileProblem, KeyError, ValueError):
        return []  # the model check says what is wrong with the base
    return problems(t.offload.blocks, family=spec.title, streams=spec.offload_blocks != (),
                    trains_base_weights=recipe.strategy.kind is not None and recipe.strategy.trains_base_weights,
                    gradient_checkpointing=t.gradient_checkpointing, compile_mode=t.compile,
                    engine=requested_engine())


def check_optimizers(recipe: Recipe) -> list[str]:
    """train.optimizer and optimizer_args against the optimizer's own constructor (finetune/training/optimizers.py):
    its package imports, every argument is one it takes, and the rate and schedule can apply to it."""
    from finetune.training.optimizers import problems

    t = recipe.train
    if not isinstance(t.optimizer_args, dict):
        return [f"train.optimizer_args: a mapping of the optimizer's arguments (e.g. {{d_coef: 0.5}}), got "
                f"{t.optimizer_args!r}"]
    rate = recipe.strategy.learning_rate or t.learning_rate
    if not (math.isfinite(rate) and rate > 0):
        return []  # refused by the key's bounds (schema.py)
    return problems(t.optimizer, t.optimizer_args, rate, t.lr_scheduler, t.lr_warmup_steps)


def check_ema(recipe: Recipe) -> list[str]:
    from finetune.training.ema import problems  # its rules live beside the average they keep

    t = recipe.train
    return problems(t.ema, t.optimizer, t.max_steps)


def check_prompts(recipe: Recipe) -> list[str]:
    """sample.prompts' mappings and sample.prompt_file (finetune/training/sample_prompts.py): keys, values, sizes a
    multiple of the VAE's downsampling where the base's folder tells it (setup checks a hub base's), and control
    images (their files, and how many the family takes, where model.family or the base's folder tells it)."""
    from finetune.models import family_told
    from finetune.training.sample_prompts import checked_prompts

    known = vae_downsampling(recipe.model.base)
    why = (f"this base's VAE downsamples by {known}" if known else
           "Stable Diffusion's VAE downsamples by 8; the base's own is checked when it loads")
    family = family_told(recipe.model.family, recipe.model.base)
    return checked_prompts(recipe.sample, recipe.data.resolution, known or 8, why, family)[2]
