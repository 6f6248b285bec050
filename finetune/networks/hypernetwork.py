"""Hypernetworks in AUTOMATIC1111's design, applied to a diffusers U-Net or a transformer's text stream.

For each width d a pair of residual MLPs (H_k, H_v) rewrites what an attention layer's keys and values are
computed from: `k = to_k(H_k(c))`, `v = to_v(H_v(c))`, with `H(x) = x + mlp(x) * strength`; queries are
untouched. Cross-attention layers use the pair for their context width (768 on SD1); self-attention layers
use the pair for their own width (320/640/1280 on SD1) when the network has one. On a transformer the pair
rewrites the text stream's key/value projections instead (SD3, Flux: `add_k_proj` / `add_v_proj`; which layers
and projections is the family's declaration, finetune/networks/hypernetwork_points.py).

How it attaches: an attention processor that wraps whatever processor the layer already has (SDPA, xformers,
another hypernetwork's). It hands the inner processor a stand-in for the layer whose `to_k` / `to_v` (or the
text stream's projections) first apply the MLPs, so diffusers' attention code runs unchanged and a peft LoRA on
the projection sees the rewritten input too. Unloading puts the layer's previous processor back. The MLPs live
in `<denoiser>.finetune_hypernetworks` so they follow it across devices and, in training, through accelerate's
wrapping.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from finetune.networks.hypernetwork_points import (TextStream, attention_layers, points, refuse_another_kind,
                                                   widths_of)

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
    text_stream: TextStream | None = None  # None: a U-Net's cross-attention (A1111's); else the transformer's


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
        if str(width) not in self.pairs:  # a ModuleDict has no .get
            return None
        pair = self.pairs[str(width)]
        return pair["k"], pair["v"]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{key[len('pairs.'):]}": value for key, value in self.state_dict().items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.load_state_dict({f"pairs.{key}": value for key, value in tensors.items()})


class _RewrittenKeysValues:
    """Stands in for an Attention layer inside the wrapped processor: the key and value projections (`to_k` /
    `to_v`, or the text stream's `add_k_proj` / `add_v_proj`) first apply the MLPs, every other attribute is the
    layer's own. The projections are looked up per call, so a peft layer put there later is found."""

    # plain attributes, no __slots__ and no object.__getattribute__: torch.compile (train.compile) traces those
    def __init__(self, attn: Any, pair: tuple[HyperMLP, HyperMLP], keys: str, values: str):
        self._attn = attn
        project_k, project_v = getattr(attn, keys), getattr(attn, values)
        self._rewritten = {keys: lambda x, *a, **kw: project_k(pair[0](x), *a, **kw),
                           values: lambda x, *a, **kw: project_v(pair[1](x), *a, **kw)}

    def __getattr__(self, name: str) -> Any:  # only for what the instance itself lacks
        if name in self._rewritten:
            return self._rewritten[name]
        return getattr(self._attn, name)


class HypernetworkProcessor:
    """Wraps a layer's processor; `inner` is what unloading puts back. `keys` / `values`: the projections whose
    input the pair rewrites."""

    def __init__(self, inner: Any, network: Hypernetwork, pair: tuple[HyperMLP, HyperMLP], name: str,
                 keys: str = "to_k", values: str = "to_v"):
        self.network, self.pair, self.name, self.keys, self.values = network, pair, name, keys, values
        self.inner = inner

    @property
    def inner(self) -> Any:
        return self._inner

    @inner.setter
    def inner(self, processor: Any) -> None:
        self._inner = processor
        self.__class__ = _named_like(type(processor))

    def __call__(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.network.enabled:
            return self.inner(attn, hidden_states, *args, **kwargs)
        stand_in = _RewrittenKeysValues(attn, self.pair, self.keys, self.values)
        return self.inner(stand_in, hidden_states, *args, **kwargs)


@functools.lru_cache(maxsize=None)
def _named_like(processor_type: type) -> type:
    """A HypernetworkProcessor class whose __call__ names the keywords `processor_type`'s names: diffusers'
    attention layers hand a processor only those (Attention.forward reads inspect.signature(processor.__call__);
    Z-Image's freqs_cis would be dropped). A class rather than a __call__ set on each instance, so that
    torch.compile (train.compile) traces the call instead of breaking the graph there."""
    def __call__(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return HypernetworkProcessor.__call__(self, attn, hidden_states, *args, **kwargs)

    __call__.__signature__ = inspect.signature(processor_type.__call__)
    return type(f"Hypernetwork{processor_type.__name__}", (HypernetworkProcessor,), {"__call__": __call__})


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
    """Wrap the processor of every attention layer the network acts on (hypernetwork_points.py) and has a width
    for; returns how many. ValueError: another kind of model than the network's, or no layer of its widths."""
    stream = network.structure.text_stream
    refuse_another_kind(unet, stream)
    holder = getattr(unet, MODULE_NAME, None)
    if holder is None:
        holder = _Loaded()
        unet.add_module(MODULE_NAME, holder)
    if name in holder.names:
        raise ValueError(f"a hypernetwork named {name!r} is already loaded; unload it or pick another name")
    param = next(unet.parameters())
    holder.add(name, network.to(param.device))
    count = 0
    for point in points(unet, stream, network.structure.self_attention):
        pair = network.pair(point.width)
        if pair is not None:
            processor = HypernetworkProcessor(point.attn.processor, network, pair, name, point.keys, point.values)
            point.attn.set_processor(processor)
            count += 1
    if count == 0:
        detach(unet, name)
        widths = list(widths_of(unet, False, stream))
        where = (f"this U-Net (its context width is {widths})" if stream is None else
                 f"{stream.describe()} ({f'its widths are {widths}' if widths else 'this model has no such layer'})")
        raise ValueError(f"the hypernetwork's widths {list(network.structure.widths)} match no attention layer of "
                         f"{where}; it was made for another base")
    return count


def detach(unet: nn.Module, name: str | None = None) -> list[str]:
    """Remove one hypernetwork (`name`) or all of them; every other processor stays as it was."""
    names = list(loaded(unet))
    if name is not None and name not in names:
        raise ValueError(f"no hypernetwork named {name!r} is loaded (loaded: {names or 'none'})")
    removing = set(names if name is None else [name])
    for _, attn in attention_layers(unet):
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
