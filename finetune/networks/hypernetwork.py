"""Hypernetworks in AUTOMATIC1111's design, applied to a diffusers U-Net.

For each width d a pair of residual MLPs (H_k, H_v) rewrites what an attention layer's keys and values are
computed from: `k = to_k(H_k(c))`, `v = to_v(H_v(c))`, with `H(x) = x + mlp(x) * strength`; queries are
untouched. Cross-attention layers use the pair for their context width (768 on SD1); self-attention layers
use the pair for their own width (320/640/1280 on SD1) when the network has one.

How it attaches: an attention processor that wraps whatever processor the layer already has (SDPA, xformers,
another hypernetwork's). It hands the inner processor a stand-in for the layer whose `to_k` / `to_v` first
apply the MLPs, so diffusers' attention code runs unchanged and a peft LoRA on `to_k` sees the rewritten
input too. Unloading puts the layer's previous processor back. The MLPs live in `unet.finetune_hypernetworks`
so they follow the U-Net across devices and, in training, through accelerate's wrapping.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

MODULE_NAME = "finetune_hypernetworks"

# AUTOMATIC1111's activation names (its "swish" is torch's Hardswish)
ACTIVATIONS: dict[str, type[nn.Module] | None] = {
    "linear": None, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU, "swish": nn.Hardswish,
    "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
}
# our init names -> AUTOMATIC1111's
WEIGHT_INITS: dict[str, str] = {"normal": "Normal", "xavier": "XavierNormal", "xavier_uniform": "XavierUniform",
                                "kaiming": "KaimingNormal", "kaiming_uniform": "KaimingUniform"}


@dataclass(frozen=True)
class Structure:
    """Everything needed to rebuild the MLPs from their weights (what the file header carries)."""

    layer_structure: tuple[float, ...] = (1, 2, 1)
    activation: str = "linear"
    layer_norm: bool = False
    dropout_structure: tuple[float, ...] = (0.0, 0.0, 0.0)  # dropout after each layer, A1111's convention
    activate_output: bool = False
    self_attention: bool = False  # also the U-Net's own widths
    widths: tuple[int, ...] = field(default=())


def dropout_structure(layer_structure: tuple[float, ...], p: float) -> tuple[float, ...]:
    """`p` after every hidden layer, none at the input or output (what AUTOMATIC1111 builds from use_dropout)."""
    n = len(layer_structure)
    return tuple(0.0 if i in (0, n - 1) else float(p) for i in range(n))


class HyperMLP(nn.Module):
    """x + mlp(x) * strength. `linear` is built in AUTOMATIC1111's module order (Linear, activation, LayerNorm,
    Dropout per layer), so its state-dict keys (`linear.0.weight`, ...) are the ones A1111 files use."""

    def __init__(self, width: int, structure: Structure):
        super().__init__()
        s = structure.layer_structure
        layers: list[nn.Module] = []
        for i in range(len(s) - 1):
            layers.append(nn.Linear(int(width * s[i]), int(width * s[i + 1])))
            last = i == len(s) - 2
            activation = ACTIVATIONS[structure.activation]
            if activation is not None and (not last or structure.activate_output):
                layers.append(activation())
            if structure.layer_norm:
                layers.append(nn.LayerNorm(int(width * s[i + 1])))
            if structure.dropout_structure[i + 1] > 0:
                layers.append(nn.Dropout(p=structure.dropout_structure[i + 1]))
        self.linear = nn.Sequential(*layers)
        self.strength = 1.0

    def linears(self) -> list[nn.Linear]:
        return [m for m in self.linear if isinstance(m, nn.Linear)]

    def initialise(self, weight_init: str, zero_last: bool, activation: str) -> None:
        nonlinearity = "leaky_relu" if activation == "leakyrelu" else "relu"
        with torch.no_grad():
            for layer in self.linears():
                if weight_init == "normal":
                    nn.init.normal_(layer.weight, std=0.01)
                elif weight_init in ("xavier", "xavier_uniform"):
                    (nn.init.xavier_normal_ if weight_init == "xavier" else nn.init.xavier_uniform_)(layer.weight)
                else:
                    init = nn.init.kaiming_normal_ if weight_init == "kaiming" else nn.init.kaiming_uniform_
                    init(layer.weight, nonlinearity=nonlinearity)
                nn.init.zeros_(layer.bias)
            if zero_last:
                # the residual branch starts at exactly zero: the network changes nothing until it has learned
                nn.init.zeros_(self.linears()[-1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = next(self.linear.parameters()).dtype
        # the MLP keeps its own (fp32 when trained) dtype whatever the frozen base's
        return x + (self.linear(x.to(dtype)) * self.strength).to(x.dtype)


class Hypernetwork(nn.Module):
    """{width: (H_k, H_v)}, stored as a ModuleDict "width" -> {"k", "v"} (state-dict keys `768.k.linear.0.weight`)."""

    def __init__(self, structure: Structure):
        super().__init__()
        self.structure = structure
        self.pairs = nn.ModuleDict({str(w): nn.ModuleDict({"k": HyperMLP(w, structure), "v": HyperMLP(w, structure)})
                                    for w in structure.widths})
        self.enabled = True

    def set_strength(self, strength: float) -> None:
        for mlp in self.modules():
            if isinstance(mlp, HyperMLP):
                mlp.strength = float(strength)

    def pair(self, width: int) -> tuple[HyperMLP, HyperMLP] | None:
        pair = self.pairs[str(width)] if str(width) in self.pairs else None
        return (pair["k"], pair["v"]) if pair is not None else None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{key[len('pairs.'):]}": value for key, value in self.state_dict().items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.load_state_dict({f"pairs.{key}": value for key, value in tensors.items()})


class _RewrittenKeysValues:
    """Stands in for an Attention layer inside the wrapped processor: `to_k` / `to_v` first apply the MLPs,
    every other attribute is the layer's own."""

    __slots__ = ("_attn", "to_k", "to_v")

    def __init__(self, attn: Any, pair: tuple[HyperMLP, HyperMLP]):
        object.__setattr__(self, "_attn", attn)
        to_k, to_v = attn.to_k, attn.to_v
        object.__setattr__(self, "to_k", lambda x, *a, **kw: to_k(pair[0](x), *a, **kw))
        object.__setattr__(self, "to_v", lambda x, *a, **kw: to_v(pair[1](x), *a, **kw))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._attn, name)


class HypernetworkProcessor:
    """Wraps a layer's processor; `inner` is what unloading puts back."""

    def __init__(self, inner: Any, network: Hypernetwork, pair: tuple[HyperMLP, HyperMLP], name: str):
        self.inner, self.network, self.pair, self.name = inner, network, pair, name

    def __call__(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.network.enabled:
            return self.inner(attn, hidden_states, *args, **kwargs)
        return self.inner(_RewrittenKeysValues(attn, self.pair), hidden_states, *args, **kwargs)


def _attention_layers(unet: nn.Module) -> list[tuple[str, Any]]:
    return [(name, m) for name, m in unet.named_modules() if hasattr(m, "set_processor") and hasattr(m, "to_k")]


def _is_cross_attention(attn: Any) -> bool:
    # a transformer's joint attention (SD3, Flux) has no such flag: it attends to both streams at once
    return bool(getattr(attn, "is_cross_attention", False))


def _input_width(attn: Any) -> int:
    # to_k may be a peft layer around the Linear; both expose in_features
    return int(attn.to_k.in_features)


def widths_of(unet: nn.Module, self_attention: bool) -> tuple[int, ...]:
    """The widths a new hypernetwork needs: cross-attention context widths, plus self-attention widths."""
    found = {_input_width(a) for _, a in _attention_layers(unet) if _is_cross_attention(a) or self_attention}
    return tuple(sorted(found))


class _Loaded(nn.Module):
    """The hypernetworks a U-Net carries, in load order (a list: any name is allowed, none clashes with a
    Module attribute)."""

    def __init__(self):
        super().__init__()
        self.networks = nn.ModuleList()
        self.names: list[str] = []

    def add(self, name: str, network: Hypernetwork) -> None:
        self.networks.append(network)
        self.names.append(name)

    def remove(self, name: str) -> None:
        index = self.names.index(name)
        del self.networks[index]
        del self.names[index]

    def as_dict(self) -> dict[str, Hypernetwork]:
        return dict(zip(self.names, self.networks))


def attach(unet: nn.Module, network: Hypernetwork, name: str) -> int:
    """Wrap the processor of every attention layer the network has a width for; returns how many."""
    holder = getattr(unet, MODULE_NAME, None)
    if holder is None:
        holder = _Loaded()
        unet.add_module(MODULE_NAME, holder)
    if name in holder.names:
        raise ValueError(f"a hypernetwork named {name!r} is already loaded; unload it or pick another name")
    param = next(unet.parameters())
    holder.add(name, network.to(param.device))
    count = 0
    for _, attn in _attention_layers(unet):
        if not _is_cross_attention(attn) and not network.structure.self_attention:
            continue
        pair = network.pair(_input_width(attn))
        if pair is not None:
            attn.set_processor(HypernetworkProcessor(attn.processor, network, pair, name))
            count += 1
    if count == 0:
        detach(unet, name)
        raise ValueError(f"the hypernetwork's widths {list(network.structure.widths)} match no attention layer of "
                         f"this U-Net (its context width is {widths_of(unet, False)}); it was made for another base")
    return count


def detach(unet: nn.Module, name: str | None = None) -> list[str]:
    """Remove one hypernetwork (`name`) or all of them; every other processor stays as it was."""
    names = list(loaded(unet))
    if name is not None and name not in names:
        raise ValueError(f"no hypernetwork named {name!r} is loaded (loaded: {names or 'none'})")
    removing = set(names if name is None else [name])
    for _, attn in _attention_layers(unet):
        attn.set_processor(_without(attn.processor, removing))
    holder = getattr(unet, MODULE_NAME, None)
    for gone in removing:
        holder.remove(gone)
    if holder is not None and not holder.names:
        delattr(unet, MODULE_NAME)
    return sorted(removing)


def _without(processor: Any, names: set[str]) -> Any:
    if not isinstance(processor, HypernetworkProcessor):
        return processor
    inner = _without(processor.inner, names)
    if processor.name in names:
        return inner
    processor.inner = inner
    return processor


def loaded(unet: nn.Module) -> dict[str, Hypernetwork]:
    holder = getattr(unet, MODULE_NAME, None)
    return holder.as_dict() if holder is not None else {}
