"""Strategies by `strategy.kind`. Each module defines `Options` (its recipe keys) and `Strategy`.

Modules are imported on demand so that `finetune validate` stays quick.
"""
from __future__ import annotations

import importlib
from types import ModuleType

KINDS: dict[str, str] = {
    "lora": "finetune.strategies.lora",
    "dreambooth": "finetune.strategies.dreambooth",
    "textual_inversion": "finetune.strategies.textual_inversion",
    "hypernetwork": "finetune.strategies.hypernetwork",
}


def strategy_module(kind: str) -> ModuleType:
    return importlib.import_module(KINDS[kind])


def options_class(kind: str) -> type:
    return strategy_module(kind).Options


def create_strategy(options):
    return strategy_module(options.kind).Strategy(options)
