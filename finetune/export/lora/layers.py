"""A LoRA file as what it means: per component, per adapted module, the factors `down`, `up` and `alpha`.

Every LoRA tool (convert, resize, merge, inspect, resuming from a file) works on this view, so each file layout
needs only a reader and a writer (diffusers.py, kohya.py). A layer's change to its module's weight is
`up @ down * alpha / rank` (conv: `down` holds the kernel, `up` is 1x1). LoHa, LoKr and OFT files are read as peft
holds them (AdapterFile). This module imports nothing else of the package: the others build on it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import torch

# header keys of finetune's LoRA-family files: the variant ("lora", "loha", "lokr", "oft") and, in the
# peft-adapter file, each component's peft config as JSON
VARIANT_KEY = "finetune.variant"
PEFT_CONFIG_KEY = "finetune.peft_config"


class LoraFileError(ValueError):
    """A LoRA file this toolkit cannot read or write as asked; the message says why and what to do."""


@dataclass
class LoraLayer:
    down: torch.Tensor  # [rank, in] or [rank, in, kh, kw]
    up: torch.Tensor  # [out, rank] or [out, rank, 1, 1]
    alpha: float
    magnitude: Optional[torch.Tensor] = None  # DoRA's per-output magnitude vector
    bias: Optional[torch.Tensor] = None  # peft's lora_bias (extract-lora writes it for changed biases)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> torch.Tensor:
        """The change this layer adds to its module's weight (without DoRA's renormalisation)."""
        up, down = self.up.float(), self.down.float()
        product = up.reshape(up.shape[0], -1) @ down.reshape(self.rank, -1)
        return (product * (self.alpha / self.rank)).reshape(up.shape[0], *down.shape[1:])


@dataclass
class LoraWeights:
    layers: dict[str, dict[str, LoraLayer]]  # component (as the pipeline names it) -> module path -> layer
    metadata: dict[str, str] = field(default_factory=dict)
    format: str = "diffusers"  # the file layout it was read from: "diffusers" or "kohya"

    def modules(self) -> list[tuple[str, str, LoraLayer]]:
        return [(c, m, layer) for c, per in self.layers.items() for m, layer in sorted(per.items())]

    @property
    def uses_dora(self) -> bool:
        return any(layer.magnitude is not None for _, _, layer in self.modules())


@dataclass
class AdapterFile:
    """LoHa, LoKr or OFT layers as peft holds them: per component its state dict and its config as a dict."""

    variant: str  # "loha", "lokr" or "oft"
    states: dict[str, dict[str, torch.Tensor]]  # component -> peft state dict ("<module>.hada_w1_a", ...)
    configs: dict[str, dict]  # component -> peft config as a dict (r, alpha, rank_pattern, ...)
    metadata: dict[str, str] = field(default_factory=dict)  # the training header (training_header)


def training_header(metadata: dict[str, str]) -> dict[str, str]:
    """A file's header without the keys its writer derives from the layers: they would describe the old file."""
    return {k: v for k, v in metadata.items() if k not in (PEFT_CONFIG_KEY, "format")}


def _matches(pattern: str, module: str) -> bool:
    # how peft reads rank_pattern / alpha_pattern keys: the pattern matches the module path's tail
    return re.match(rf"(.*\.)?({pattern})$", module) is not None


def per_module(config: dict, default_key: str, pattern_key: str, module: str, fallback: float) -> float:
    """A peft config's value for one module: its pattern's if one matches, else the default, else `fallback`."""
    for pattern, value in (config.get(pattern_key) or {}).items():
        if _matches(pattern, module):
            return float(value)
    value = config.get(default_key)
    return float(value) if value is not None else fallback


def peft_config(layers: dict[str, LoraLayer], use_dora: bool = False) -> dict:
    """A LoraConfig dict for one component that rebuilds exactly these layers (ranks and alphas per module)."""
    ranks = {m: layer.rank for m, layer in layers.items()}
    alphas = {m: layer.alpha for m, layer in layers.items()}
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    # full module paths as patterns: "to_q" alone would also match every other block's to_q
    return {"r": rank, "lora_alpha": alpha, "target_modules": sorted(layers),
            "rank_pattern": {m: r for m, r in ranks.items() if r != rank},
            "alpha_pattern": {m: a for m, a in alphas.items() if a != alpha},
            "use_dora": use_dora, "lora_bias": any(layer.bias is not None for layer in layers.values()),
            "lora_dropout": 0.0, "bias": "none", "init_lora_weights": True}


def peft_state_dict(layers: dict[str, LoraLayer]) -> dict[str, torch.Tensor]:
    """The keys `set_peft_model_state_dict` takes for one component."""
    out = {}
    for module, layer in layers.items():
        out[f"{module}.lora_A.weight"] = layer.down
        out[f"{module}.lora_B.weight"] = layer.up
        if layer.bias is not None:
            out[f"{module}.lora_B.bias"] = layer.bias
        if layer.magnitude is not None:
            out[f"{module}.lora_magnitude_vector"] = layer.magnitude
    return out
