"""Constant tensors a family would otherwise rebuild on the host every step and copy to the device: position ids
(Flux's and Chroma's (0, row, col) image ids, Flux.2's four-axis ones), a VAE's per-channel latents_mean / std.

A copy from pageable host memory makes the host wait for the device to finish the work queued before it, once a
step (issue 35: no host round trip in a step). They depend only on a shape or a config, so each is built once per
(what, shape or values, device, dtype) and reused.
"""
from __future__ import annotations

from typing import Callable, Hashable

import torch

_KEPT: dict[Hashable, torch.Tensor] = {}
_MOST = 256  # a run meets one entry per bucket shape; a long-lived process is kept from growing without end


def on_device(key: Hashable, build: Callable[[], torch.Tensor], device: torch.device,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """`build()`'s tensor on `device` (and in `dtype` when given), built and copied the first time `key` is asked
    for on that device and dtype, then the same tensor every time. `key` must name everything the tensor depends
    on (the helper and the shape). Do not modify the result in place."""
    full_key = (key, str(device), dtype)
    kept = _KEPT.get(full_key)
    if kept is None:
        if len(_KEPT) >= _MOST:
            _KEPT.clear()
        kept = build().to(device=device, dtype=dtype) if dtype is not None else build().to(device)
        _KEPT[full_key] = kept
    return kept
