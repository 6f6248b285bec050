"""Where a recipe's relative paths point. One rule, for every path key, whether the path exists yet or not
(output_dir included): a path is relative to where it was written.

- written in the recipe file: relative to the file's folder, so a recipe and its data can move together and the
  recipe works from any working directory;
- given on the command line (`key=value` overrides): relative to the working directory, as any shell argument.

`model.base` and `data.dataset` may also name a hub repository (`owner/name`): such a value is a hub id unless a
folder of that name exists where the path would point (diffusers' and datasets' own order: local first).
Every path comes out absolute, so the run's summary and its files' metadata say exactly where things were.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from finetune.data.prepare import held_out_fraction
from finetune.recipe.checks import looks_like_local_path
from finetune.recipe.schema import Recipe

# (section, key) of the recipe's own path keys; a strategy marks its own with field metadata {"path": True}
PATH_KEYS = (("model", "base"), ("model", "config"), ("model", "vae"), ("data", "images"), ("data", "dataset"),
             ("", "output_dir"), ("prior", "class_data_dir"), ("cache", "dir"), ("validation", "images"),
             ("sample", "prompt_file"), ("data", "masks"), ("validation", "clip_model"), ("validation", "dino_model"))
MAY_BE_HUB_IDS = {("model", "base"), ("model", "vae"), ("data", "dataset"), ("validation", "clip_model"),
                  ("validation", "dino_model")}


def resolve_paths(recipe: Recipe, recipe_dir: Path, command_line_keys: set[str]) -> None:
    """Make every relative path in `recipe` absolute by the rule above, in place. `command_line_keys`: the dotted
    keys the command line set (e.g. {"output_dir", "train.max_steps"})."""
    keys = list(PATH_KEYS)
    if recipe.strategy is not None:
        keys += [("strategy", f.name) for f in dataclasses.fields(recipe.strategy) if f.metadata.get("path")]
    for section_name, key in keys:
        section = getattr(recipe, section_name) if section_name else recipe
        value = getattr(section, key)
        if not value or (section_name, key) == ("validation", "images") and held_out_fraction(value) is not None:
            continue  # validation.images: 0.1 is a fraction of the training images, not a path
        if (section_name, key) == ("data", "masks") and value == "alpha":
            continue  # each image's alpha channel, not a folder
        dotted = f"{section_name}.{key}" if section_name else key
        anchor = Path.cwd() if dotted in command_line_keys else recipe_dir
        setattr(section, key, _resolve(str(value), anchor, (section_name, key) in MAY_BE_HUB_IDS))
    control = recipe.data.control
    if control is not None and control.folders:  # a list in a nested section: each folder by the same rule
        given = command_line_keys & {"data.control", "data.control.folders"}
        anchor = Path.cwd() if given else recipe_dir
        control.folders = [_resolve(str(folder), anchor, False) for folder in control.folders]
    # an edit model's control images in sample.prompts' mappings follow the same rule
    from finetune.training.control_images import KEY, anchored

    anchor = Path.cwd() if "sample.prompts" in command_line_keys else recipe_dir
    recipe.sample.prompts = [{**p, KEY: anchored(p[KEY], anchor)} if isinstance(p, dict) and KEY in p else p
                             for p in recipe.sample.prompts]


def _resolve(value: str, anchor: Path, may_be_hub_id: bool) -> str:
    path = Path(os.path.expanduser(value))
    candidate = path if path.is_absolute() else anchor / path
    if may_be_hub_id and not candidate.exists() and not looks_like_local_path(value):
        return value  # owner/name on the hub
    return os.path.normpath(os.path.abspath(candidate))
