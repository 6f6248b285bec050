"""Where a hypernetwork acts: the attention layers, and the two projections in each whose input it rewrites.

- A U-Net (SD 1.x/2.x, SDXL; AUTOMATIC1111's design): every cross-attention layer's `to_k` / `to_v`, which read
  the text encoder's context; with `self_attention`, every other attention layer's too, at the U-Net's widths.
- A transformer's text stream, as its family declares it (`ModelFamily.hypernetwork_text_stream`, a
  `TextStream`): the attention layers under a module path whose named projections compute keys and values from
  the caption tokens alone. SD3's joint blocks and Flux's double blocks: `add_k_proj` / `add_v_proj`, on the
  context (`encoder_hidden_states`); Z-Image's `context_refiner` (attention over the caption alone): `to_k` /
  `to_v`. Projections that read image tokens (the joint blocks' `to_k`, Flux's single blocks, Z-Image's main
  layers) are left alone: the MLPs act on the text, as A1111's do on a U-Net's context.

A network made for a text stream records it, with the denoiser's class, in its structure (and so in its file):
loading finds the same points with no arguments and refuses another kind of model by name.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class TextStream:
    """A transformer's text stream, as a family declares it: the attention layers whose module path in the
    denoiser starts with `layers`, and their projections computing keys (`keys`) and values (`values`) from the
    text tokens alone. `model`: the denoiser's class, filled in when a network is made for it (`for_model`)."""

    layers: str  # "transformer_blocks." (SD3, Flux's double blocks), "context_refiner." (Z-Image)
    keys: str  # "add_k_proj" / "to_k"
    values: str  # "add_v_proj" / "to_v"
    model: str = ""  # "SD3Transformer2DModel", ...: what a file records; "" matches any class

    def for_model(self, denoiser: nn.Module) -> TextStream:
        return dataclasses.replace(self, model=type(getattr(denoiser, "module", denoiser)).__name__)

    def describe(self) -> str:
        return f"{self.model or 'the transformer'}'s text stream ({self.layers}*: {self.keys}, {self.values})"


@dataclass(frozen=True)
class Point:
    """One attention layer a network acts on: its module path, the layer, the names of the projections whose
    input is rewritten, and that input's width (which MLP pair it takes)."""

    name: str
    attn: Any
    keys: str
    values: str
    width: int


def attention_layers(denoiser: nn.Module) -> list[tuple[str, Any]]:
    """(module path, layer) of every diffusers attention layer (one with a processor)."""
    return [(name, m) for name, m in denoiser.named_modules() if hasattr(m, "set_processor") and hasattr(m, "to_k")]


def _is_cross_attention(attn: Any) -> bool:
    # a transformer's joint attention (SD3, Flux) has no such flag: it attends to both streams at once
    return bool(getattr(attn, "is_cross_attention", False))


def points(denoiser: nn.Module, stream: TextStream | None, self_attention: bool = False) -> list[Point]:
    """Where a network for `stream` (None: a U-Net's cross-attention, plus self-attention when asked) acts."""
    found = []
    for name, attn in attention_layers(denoiser):
        if stream is None:
            if _is_cross_attention(attn) or self_attention:
                found.append(Point(name, attn, "to_k", "to_v", int(attn.to_k.in_features)))
        elif (name.startswith(stream.layers) and getattr(attn, stream.keys, None) is not None
              and getattr(attn, stream.values, None) is not None):
            # in_features: a peft layer around the Linear has it too
            found.append(Point(name, attn, stream.keys, stream.values, int(getattr(attn, stream.keys).in_features)))
    return found


def widths_of(denoiser: nn.Module, self_attention: bool, stream: TextStream | None = None) -> tuple[int, ...]:
    """The widths a new network needs: a U-Net's cross-attention context widths (plus its self-attention widths
    with `self_attention`), or the input widths of a text stream's projections."""
    return tuple(sorted({p.width for p in points(denoiser, stream, self_attention)}))


def refuse_another_kind(denoiser: nn.Module, stream: TextStream | None) -> None:
    """ValueError when a network for `stream` cannot act on this kind of denoiser: a text-stream network on
    another class than the one it was made for, a U-Net network on a model without cross-attention."""
    kind = type(denoiser).__name__
    if stream is None:
        if not any(_is_cross_attention(attn) for _, attn in attention_layers(denoiser)):
            raise ValueError(f"this hypernetwork rewrites a U-Net's cross-attention context (AUTOMATIC1111's "
                             f"design), and this {kind} has no cross-attention; load it onto the U-Net base (SD "
                             "1.x/2.x, SDXL) it was made for, or train one on this base")
    elif stream.model and stream.model not in {c.__name__ for c in type(denoiser).__mro__}:
        raise ValueError(f"this hypernetwork rewrites {stream.describe()}, and this pipeline's denoiser is a "
                         f"{kind}; load it onto a pipeline of the base it was trained on")
