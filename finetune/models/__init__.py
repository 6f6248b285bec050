"""Model families. Each file holds one family; `family_for` picks one by name."""
from __future__ import annotations

import importlib
from typing import Any

_FROM_BASE = ("Components", "ModelFamily", "ModelLoadError")
# model.family -> (module, class): each family is one file here (imported on first use: torch and diffusers)
FAMILIES = {"sd": ("finetune.models.stable_diffusion", "StableDiffusion"),
            "sdxl": ("finetune.models.sdxl", "StableDiffusionXL")}


def family_for(name: str, base: str | None = None, hub: bool = False) -> Any:
    """The family called `name` ("auto": told from `base` where it can be, finetune/models/detect.py; with `hub`,
    a hub id's model_index.json is fetched to tell it, as loading would). Raises UnsupportedFamily, a ValueError
    naming it, for a base of a family not trained here."""
    if name == "auto" and base is not None:
        from finetune.models.detect import family_of, hub_family

        # a .ckpt, or a hub id not looked up: Stable Diffusion 1.x/2.x unless model.family says otherwise
        name = family_of(base) or (hub and hub_family(base)) or "sd"
    if name == "auto":
        name = "sd"
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; one of {', '.join(FAMILIES)}")
    module, class_name = FAMILIES[name]
    return getattr(importlib.import_module(module), class_name)()


def __getattr__(name: str) -> Any:
    # loaded on first use, so that recipe checks can read model folders (pipeline_folder.py) without torch
    if name in _FROM_BASE:
        from finetune.models import base

        return getattr(base, name)
    raise AttributeError(f"module 'finetune.models' has no attribute {name!r}")


__all__ = [*_FROM_BASE, "family_for"]
