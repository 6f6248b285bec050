"""`strategy.target_preset`: LoRA targets by the name of a set the anchors train, from the family's
`lora_target_presets` (name -> module-path patterns; Flux's say which anchor each one matches, models/flux.py).

A preset is resolved to the denoiser's own Linear module paths, matched whole: a module name alone ("proj_out")
would, as a peft target, also catch same-named modules elsewhere (Flux's final layer).
"""
from __future__ import annotations

import re
from typing import Any

import torch


def presets_of(family: Any) -> dict[str, tuple[str, ...]]:
    """The family's presets (empty for a family without any)."""
    return dict(getattr(family, "lora_target_presets", None) or {})


def preset_problems(preset: str | None, target_modules: list[str], recipe: Any) -> list[str]:
    """What is wrong with `strategy.target_preset` in this recipe: a preset together with target_modules, a
    family without presets, or a name the family does not have."""
    if preset is None:
        return []
    if target_modules:
        return [("strategy.target_preset: set together with strategy.target_modules; keep one (the preset names "
                 "a set of modules, target_modules lists them)")]
    from finetune.models import family_told

    # a hub id's family is not told before loading: the strategy's check refuses the preset then
    family = family_told(recipe.model.family, recipe.model.base)
    if family is None:
        return []
    return refusal(family, preset)


def refusal(family: Any, preset: str) -> list[str]:
    """[the problem] when `family` has no preset called `preset`, else []."""
    presets = presets_of(family)
    if not presets:
        return [(f"strategy.target_preset: {family.name} has no target presets; remove it "
                 "(strategy.target_modules lists modules by name)")]
    if preset not in presets:
        return [f"strategy.target_preset: {family.name} has no preset {preset!r}; one of {', '.join(presets)}"]
    return []


def targets(family: Any, preset: str | None, denoiser: torch.nn.Module) -> list[str]:
    """The denoiser's LoRA targets: the family's default (`lora_targets`, peft name tails) without a preset, else
    the denoiser's Linear module paths that `preset`'s patterns match whole, sorted. ValueError (the refusal's
    text) for a preset the family does not have or one that matches nothing."""
    if preset is None:
        return list(family.lora_targets)
    problems = refusal(family, preset)
    if problems:
        raise ValueError(problems[0])
    patterns = [re.compile(pattern) for pattern in presets_of(family)[preset]]
    names = sorted(name for name, module in denoiser.named_modules()
                   if isinstance(module, torch.nn.Linear) and any(p.fullmatch(name) for p in patterns))
    if not names:
        raise ValueError(f"strategy.target_preset: {preset} matches no Linear module of this {family.name} "
                         "denoiser")
    return names
