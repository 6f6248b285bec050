"""Model families: one file each in this folder, holding its declarative `SPEC` (finetune/models/family.py) and
its behaviour. `FAMILY_MODULES` registers them; everything else (detection, recipe validation, tiny builds, the
contract tests, the README's table, `finetune env`) reads the registered specs."""
from __future__ import annotations

import importlib
from functools import lru_cache
from typing import Any

_FROM_BASE = ("Components", "ModelFamily", "ModelLoadError")
# every family trained here, by module (imported on first use: torch): adding a family is its file and one line
FAMILY_MODULES = (
    "finetune.models.stable_diffusion",
    "finetune.models.sdxl",
    "finetune.models.sd3",
    "finetune.models.flux",
    "finetune.models.flux_kontext",
    "finetune.models.zimage",
    "finetune.models.qwen_image",
    "finetune.models.flux2",
    "finetune.models.chroma",
    "finetune.models.lumina2",
    "finetune.models.sana",
    "finetune.models.hidream",
    "finetune.models.krea2",
    "finetune.models.qwen_image_2_1",
)

# what model.family: auto means when nothing tells the family before loading (a .ckpt, a hub id not looked up)
DEFAULT_FAMILY = "sd"


@lru_cache(maxsize=None)
def specs() -> dict[str, Any]:
    """{model.family value: FamilySpec} of every registered family, in FAMILY_MODULES order."""
    found = [importlib.import_module(module).SPEC for module in FAMILY_MODULES]
    return {spec.name: spec for spec in found}


def spec_of(name: str) -> Any:
    """The FamilySpec called `name`; ValueError naming the families for another name."""
    if name not in specs():
        from finetune.recipe.typed import closest

        guess = closest(name, list(specs()))
        raise ValueError(f"unknown model family {name!r}; one of {', '.join(specs())}"
                         + (f"; did you mean {guess!r}?" if guess else ""))
    return specs()[name]


def family_for(name: str, base: str | None = None, hub: bool = False) -> Any:
    """The family called `name` ("auto": told from `base` where it can be, finetune/models/detect.py; with `hub`,
    a hub id's model_index.json is fetched to tell it, as loading would). Raises UnsupportedFamily, a ValueError
    naming it, for a base of a family not trained here."""
    if name == "auto":
        name = told_family(base, hub)
    spec = spec_of(name)
    return spec.behaviour(spec)


def told_family(base: str | None, hub: bool = False) -> str:
    """The family name "auto" means for `base`: from its model_index.json or a single file's keys, with `hub` a hub
    id's model_index.json; "sd" when nothing tells (a .ckpt, a hub id not looked up). Raises UnsupportedFamily."""
    if base is None:
        return DEFAULT_FAMILY
    from finetune.models.detect import family_of, hub_family

    return family_of(base) or (hub and hub_family(base)) or DEFAULT_FAMILY


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


__all__ = [*_FROM_BASE, "DEFAULT_FAMILY", "FAMILY_MODULES", "family_for", "family_told", "spec_of", "specs",
           "told_family"]
