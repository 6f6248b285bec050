"""The strategy interface: the few places where fine-tuning methods differ, and nothing else.

The loop (finetune/training/loop.py) calls these; a strategy never imports the loop.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Iterable, Protocol

import torch

from finetune.models.base import Components, ModelFamily
from finetune.recipe.schema import StrategyOptions


class StrategySetupError(ValueError):
    """The strategy's options do not fit the loaded model (e.g. a placeholder the tokenizer already has)."""


class Strategy(Protocol):
    """Each method is one every strategy writes out (none inherits defaults: what a strategy does at each place
    is read in its own file). Whether it trains the base's own weights is `options.trains_base_weights`."""

    options: StrategyOptions
    # file name of the final artifact inside output_dir
    artifact_name: str

    def check(self, family: ModelFamily, parts: Components) -> None:
        """Raise StrategySetupError if the options cannot work on this model; runs right after loading,
        before any long work (class images, training)."""

    def prepare(self, family: ModelFamily, parts: Components, keep_frozen_base: bool = False) -> None:
        """Inject layers / add tokens into the frozen base; mark what trains with requires_grad.
        `keep_frozen_base`: `frozen_base` will be asked for (a strategy that trains base weights in place
        must then keep a copy)."""

    def parameter_groups(self, learning_rate: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups (each with "params" and "lr")."""

    def prompts(self, captions: list[str], generator: torch.Generator) -> list[str]:
        """The text the instance images are trained with (e.g. textual inversion's templates and
        multi-vector tokens); most strategies keep the captions."""

    def kept_words(self) -> list[str]:
        """Words every caption must keep inside the text encoder's window (textual inversion's new tokens): a
        caption that would cut one is refused before training."""

    def frozen_base(self, parts: Components) -> AbstractContextManager[Components]:
        """Within the context, components that predict as the untouched base (prior preservation's
        base_prediction target): adapters switched off, or a frozen copy kept aside."""

    def as_loaded(self, dtype: torch.dtype) -> AbstractContextManager[None]:
        """Within the context, the trained weights are held in the dtype a pipeline whose base is in `dtype` holds
        them after loading the saved artifact (LoRA, embeddings, DreamBooth's weights: `dtype`; a hypernetwork:
        fp32), so that sample grids drawn during training are what the user's pipeline draws. The fp32 weights
        the optimizer steps are put back, unchanged, on leaving."""

    def on_step_end(self, step: int) -> bool:
        """After each optimizer step (`step` steps done), and once on resume: e.g. textual inversion restores
        frozen embedding rows; DreamBooth stops training the text encoder. Returns True when what trains changed
        (a module stopped or started requiring gradients): only then does the loop look at every parameter again
        to tell whether a text encoder still trains."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything that trains, as tensors (used for checkpoints)."""

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of state_dict, on a prepared strategy."""

    def save(self, output_dir: Path, metadata: dict[str, str]) -> Path:
        """Write the final artifact atomically into output_dir; return its path."""


@contextmanager
def unchanged_base(parts: Components):
    """frozen_base for a strategy whose changes never touch what class prompts use."""
    yield parts


@contextmanager
def held_in(modules: Iterable[torch.nn.Module], dtype: torch.dtype, keep: Any = lambda name: True):
    """Within the context, the floating-point parameters and buffers of `modules` whose name `keep(name)` accepts
    are copies in `dtype`; on leaving, the very tensors they held come back (the optimizer's parameters and their
    state are never touched). Costs one copy of those weights in `dtype` while inside."""
    swapped = []
    for module in modules:
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.is_floating_point() and tensor.dtype != dtype and keep(name):
                swapped.append((tensor, tensor.data))
                tensor.data = tensor.data.to(dtype)
    try:
        yield
    finally:
        for tensor, data in swapped:
            tensor.data = data
