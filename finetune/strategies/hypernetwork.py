"""Hypernetwork (AUTOMATIC1111's design): small residual MLPs rewrite the inputs of attention keys and values.

The U-Net and text encoder stay frozen; only the MLPs train (finetune/networks/hypernetwork.py). On a transformer
(SD3, Flux, Z-Image) they rewrite the text stream its family declares (`hypernetwork_text_stream`) instead of
cross-attention's context; A1111's .pt and `self_attention` are U-Net only there. Because they
act on every prompt, not only the concept's, prior preservation (section `prior`) matters more here than for
LoRA: `base_prediction` switches the MLPs off to get the base's own prediction, at no extra memory.
"""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from finetune.export import hypernetwork as files
from finetune.models import family_told
from finetune.models.base import Components, ModelFamily
from finetune.networks.hypernetwork import (ACTIVATIONS, HyperMLP, Hypernetwork, Structure, TextStream, attach,
                                            dropout_structure, widths_of)
from finetune.recipe.keys import key
from finetune.recipe.schema import StrategyOptions

TRAINING_NAME = "training"


@dataclass
class Options(StrategyOptions):
    layer_structure: list[float] = key(
        factory=lambda: [1.0, 2.0, 1.0],
        help="Width multipliers of each MLP's layers, as AUTOMATIC1111's \"1, 2, 1\"; must start and end with 1.")
    activation: str = key("linear", "The activation after each hidden layer: `linear` (none), `relu`, `leakyrelu`, "
                                    "`elu`, `swish`, `tanh` or `sigmoid`.")
    activate_output: bool = key(False, "The activation after the last layer too.")
    layer_norm: bool = key(False, "A LayerNorm after each layer.")
    dropout: float = key(0.0, "Dropout after every hidden layer while training; 0: none.", minimum=0, below=1)
    weight_init: Literal["normal", "xavier", "xavier_uniform", "kaiming", "kaiming_uniform"] = key(
        "normal", "How the MLPs' weights start: `normal` (std 0.01), `xavier`, `xavier_uniform`, `kaiming` or "
                  "`kaiming_uniform`.")
    zero_init_last: bool = key(True, "The last layer starts at zero, so the untrained network changes nothing (as "
                                     "LoRA's second matrix does).")
    strength: float = key(1.0, "The scale of the MLPs' residual branch while training.")
    self_attention: bool = key(False, "Also rewrite the self-attention inputs, at the U-Net's own widths (U-Net "
                                      "families only).")
    a1111_pt: bool = key(False, "Also write AUTOMATIC1111's pickled `.pt` (plain data only), the one hypernetwork "
                                "format AUTOMATIC1111 reads (U-Net families only).")
    name: str = key("hypernetwork", "The `.pt` file's name, which AUTOMATIC1111 lists.")

    def validate(self, recipe: Any) -> list[str]:
        problems = []
        s = self.layer_structure
        if len(s) < 2 or s[0] != 1 or s[-1] != 1:
            problems.append(f"strategy.layer_structure: must start and end with 1 and have at least two entries "
                            f"(e.g. [1, 2, 1]), got {s}")
        if any(x <= 0 for x in s):
            problems.append(f"strategy.layer_structure: every multiplier must be positive, got {s}")
        if self.activation not in ACTIVATIONS:
            problems.append(f"strategy.activation: {self.activation!r} is not one of {', '.join(ACTIVATIONS)}")
        if not math.isfinite(self.strength):
            problems.append(f"strategy.strength: must be a finite number, got {self.strength}")
        if not self.name.strip() or any(c in self.name for c in '/\\:*?"<>|'):
            problems.append(f"strategy.name: {self.name!r} must be a plain file name without / \\ : * ? \" < > |")
        model = getattr(recipe, "model", None)
        family = family_told(model.family, model.base) if model is not None else None
        if family is not None:
            problems += self.stream_problems(family.name, text_stream_of(family))
        return problems

    def stream_problems(self, family_name: str, stream: TextStream | None) -> list[str]:
        """What a family whose hypernetwork rewrites a transformer's text stream cannot take: A1111's .pt and
        self_attention are U-Net cross-attention's design."""
        if stream is None:
            return []
        problems = []
        if self.a1111_pt:
            problems.append(f"strategy.a1111_pt: AUTOMATIC1111's hypernetwork .pt applies to a U-Net's "
                            f"cross-attention only, and on {family_name} the network rewrites the transformer's "
                            f"text stream ({stream.keys}, {stream.values}); remove a1111_pt "
                            "(hypernetwork.safetensors loads with finetune.load_adapter)")
        if self.self_attention:
            problems.append(f"strategy.self_attention: on {family_name} the network rewrites only the text "
                            f"stream's keys and values ({stream.keys}, {stream.values}); a U-Net's self-attention "
                            "has no counterpart here (the image tokens' projections are left alone); remove it")
        return problems


def text_stream_of(family: ModelFamily | None) -> TextStream | None:
    """The family's declared text stream (None: a U-Net's cross-attention, as SD 1.x/2.x and SDXL have)."""
    return getattr(family, "hypernetwork_text_stream", None)


def structure_for(options: Options, widths: tuple[int, ...], text_stream: TextStream | None = None) -> Structure:
    layers = tuple(float(x) for x in options.layer_structure)
    return Structure(layer_structure=layers, activation=options.activation, layer_norm=options.layer_norm,
                     dropout_structure=dropout_structure(layers, options.dropout),
                     activate_output=options.activate_output, self_attention=options.self_attention, widths=widths,
                     text_stream=text_stream)


class Strategy:
    artifact_name = files.FILE_NAME

    def __init__(self, options: Options):
        self.options = options
        self.network: Hypernetwork | None = None

    def check(self, family: ModelFamily, parts: Components) -> None:
        from finetune.strategies.base import StrategySetupError

        stream = text_stream_of(family)
        if stream is None and not widths_of(parts.denoiser, False):
            raise StrategySetupError(
                f"strategy.kind: hypernetwork rewrites the context before cross-attention's keys and values; "
                f"{family.name}'s {parts.denoiser_name} has none, and the family declares no text stream "
                "(hypernetwork_text_stream) to rewrite instead; use lora")
        if stream is not None and not widths_of(parts.denoiser, False, stream):
            raise StrategySetupError(f"strategy.kind: {family.name} declares its hypernetwork text stream as "
                                     f"{stream.describe()}, and this {parts.denoiser_name} has no such layer")
        problems = self.options.stream_problems(family.name, stream)
        if problems:
            raise StrategySetupError("; ".join(problems))

    def prepare(self, family: ModelFamily, parts: Components, keep_frozen_base: bool = False) -> None:
        # keep_frozen_base needs nothing: switching the network off gives the base back
        o = self.options
        for module in parts.modules.values():
            module.requires_grad_(False)
        stream = text_stream_of(family)
        stream = stream.for_model(parts.denoiser) if stream is not None else None  # the file records the class
        network = Hypernetwork(structure_for(o, widths_of(parts.denoiser, o.self_attention, stream), stream))
        for mlp in network.modules():
            if isinstance(mlp, HyperMLP):
                mlp.initialise(o.weight_init, o.zero_init_last, o.activation)
        network.set_strength(o.strength)
        network.float().requires_grad_(True)  # trainable weights stay fp32 whatever the base's dtype
        attach(parts.denoiser, network, TRAINING_NAME)
        self.network = network

    def parameter_groups(self, learning_rate: float) -> list[dict[str, Any]]:
        return [{"params": list(self.network.parameters()), "lr": learning_rate}]

    @contextmanager
    def frozen_base(self, parts: Components):
        self.network.enabled = False
        try:
            yield parts
        finally:
            self.network.enabled = True

    def as_loaded(self, dtype: torch.dtype):
        # its loader (networks/hypernetwork.attach) builds the MLPs in fp32 whatever the pipeline's dtype, as they
        # train; they cast their input to fp32 and their output back
        return nullcontext()

    def prompts(self, captions: list[str], generator: torch.Generator) -> list[str]:
        return captions  # trained with the captions as they are

    def kept_words(self) -> list[str]:
        return []  # no word of its own that a caption must keep

    def on_step_end(self, step: int) -> bool:
        return False  # what trains never changes

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.network.tensors().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.network.load_tensors(state)

    def save(self, output_dir: Path, metadata: dict[str, str]) -> Path:
        o = self.options
        return files.save(Path(output_dir), self.network, metadata, a1111_pt=o.a1111_pt, name=o.name,
                          weight_init=o.weight_init, step=int(metadata.get("finetune.steps", 0)))
