"""The frozen base's denoiser quantised weight-only to 8 bits (`model.quantize: int8 | fp8`), the adapters kept in
full precision: what lets a Flux-size transformer and its LoRA train on a 24 GB GPU.

Through torchao (`quantize_` with `Int8WeightOnlyConfig` / `Float8WeightOnlyConfig`): PyTorch's own quantisation
library, kept by the PyTorch team; its weight-only tensors run on a CPU as on a GPU (so it is tested here), and
peft's LoRA layers train on top of them. bitsandbytes' 8-bit layers need CUDA, and quanto is in maintenance.
Merging a LoRA into quantised weights gives silently wrong weights in some libraries (84-114% off was seen with
quanto and bitsandbytes nf4), so fusing and extraction refuse a quantised base (`refuse_quantized`).
"""
from __future__ import annotations

import logging

import torch

CONFIGS = {"int8": "Int8WeightOnlyConfig", "fp8": "Float8WeightOnlyConfig"}


def quantize_weights(module: torch.nn.Module, kind: str) -> int:
    """Quantise every Linear weight of `module` in place (`kind`: "int8" or "fp8"); returns how many. Raises
    ImportError naming the install when torchao is missing."""
    # torchao logs each CUDA kernel library it cannot load on a machine without CUDA: not a problem here
    logging.getLogger("torchao").setLevel(logging.ERROR)
    try:
        import torchao.quantization as quantization
    except ImportError:
        raise ImportError("model.quantize needs torchao: pip install torchao "
                          "(or pip install 'finetune[quantize]')") from None
    linear = sum(isinstance(m, torch.nn.Linear) for m in module.modules())
    quantization.quantize_(module, getattr(quantization, CONFIGS[kind])())
    return linear


def is_quantized(module: torch.nn.Module) -> bool:
    """Whether any parameter of `module` holds torchao's quantised tensors rather than plain ones."""
    return any(type(p.data).__module__.startswith("torchao") for p in module.parameters())


def refuse_quantized(module: torch.nn.Module, what: str) -> None:
    """Raise ValueError when `module` is quantised: `what` (merging, extracting) would give wrong weights."""
    if is_quantized(module):
        raise ValueError(f"{what} needs full-precision weights, and this {type(module).__name__} is quantised "
                         "(model.quantize); load the base unquantised (the LoRA file applies to it as it is)")
