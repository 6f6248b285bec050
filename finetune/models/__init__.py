"""Model families. Each file holds one family; `family_for` picks one by name."""
from __future__ import annotations

import importlib
from typing import Any

_FROM_BASE = ("Components", "ModelFamily", "ModelLoadError")
# model.family -> (module, class, objective): each family is one file here (imported on first use: torch and
# diffusers); the objective's name says which recipe options it reads (OBJECTIVE_OPTIONS), checked before loading
FAMILIES = {"sd": ("finetune.models.stable_diffusion", "StableDiffusion", "ddpm"),
            "sdxl": ("finetune.models.sdxl", "StableDiffusionXL", "ddpm"),
            "sd3": ("finetune.models.sd3", "StableDiffusion3", "flow_matching"),
            "flux": ("finetune.models.flux", "Flux", "flow_matching"),
            "zimage": ("finetune.models.zimage", "ZImage", "flow_matching")}
# recipe options only one objective reads, with their "not set" values (finetune/models/ddpm.py, flow_matching.py);
# a family's `objective` takes its objective's as keywords named by the key's last part
OBJECTIVE_OPTIONS = {
    "ddpm": {"model.prediction_type": None, "train.min_snr_gamma": None, "train.noise_offset": 0.0},
    "flow_matching": {"flow.sigma_sampling": "auto", "flow.logit_mean": 0.0, "flow.logit_std": 1.0,
                      "flow.mode_scale": 1.29, "flow.sigmoid_scale": 1.0, "flow.shift": None,
                      "flow.resolution_shift": None, "flow.weighting": "none"},
}


def objective_values(family: str, value_of: Any) -> dict[str, object]:
    """The keywords `family.objective` takes, {"min_snr_gamma": 5.0, ...}, with `value_of(dotted key)` reading
    the recipe."""
    return {key.rsplit(".", 1)[1]: value_of(key) for key in OBJECTIVE_OPTIONS[FAMILIES[family][2]]}


def objective_problems(family: str, values: dict[str, object]) -> list[str]:
    """Problems for options (dotted recipe keys -> values) set for an objective `family` does not train with."""
    objective = FAMILIES[family][2]
    return [f"{key}: only the {other} objective reads it, and {family} trains with {objective}; remove it"
            for other, options in OBJECTIVE_OPTIONS.items() if other != objective
            for key, unset in options.items() if values.get(key, unset) != unset]


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
    module, class_name, _ = FAMILIES[name]
    return getattr(importlib.import_module(module), class_name)()


def family_told(name: str, base: str | None) -> Any | None:
    """The family `name` names or, for "auto", the one a local base tells before any weights load; None when
    nothing tells it yet (a hub id: loading will) or the base is of a family not trained here (the recipe's model
    checks report that). For recipe checks that depend on the family."""
    from finetune.models.detect import family_of

    try:
        name = name if name != "auto" else family_of(base or "")
        return family_for(name) if name else None
    except (ValueError, OSError):
        return None


def __getattr__(name: str) -> Any:
    # loaded on first use, so that recipe checks can read model folders (pipeline_folder.py) without torch
    if name in _FROM_BASE:
        from finetune.models import base

        return getattr(base, name)
    raise AttributeError(f"module 'finetune.models' has no attribute {name!r}")


__all__ = [*_FROM_BASE, "family_for", "family_told"]
