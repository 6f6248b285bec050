"""The frozen base's denoiser in 8 bits (`model.quantize`), the adapters kept in full precision on top (peft wraps
the quantised Linear layers).

- `int8` / `fp8`: weight-only, for memory (what lets a Flux-size transformer and its LoRA train on a 24 GB GPU):
  torchao's `Int8WeightOnlyConfig` / `Float8WeightOnlyConfig` store one byte a weight and multiply in the compute
  dtype.
- `int8_w8a8` / `fp8_w8a8`: 8-bit matmuls, for speed: each Linear's input is quantised on the fly per token (row)
  and its weight per output channel, and the product runs on 8-bit tensor cores, in the forward pass AND for the
  gradient w.r.t. the layer's input, which the adapters before the layer need. The weights stay stored in the base
  dtype (the 8-bit copies are made per matmul), so these save time, not memory.

Why torchao: it already is the project's quantisation library, and it is kept by the PyTorch team next to
torch.compile; its tensors and layers run on a CPU as on a GPU, so they are tested here. bitsandbytes' 8-bit
layers need CUDA, and quanto is in maintenance.

Which torchao path, and why: the inference configs `Int8DynamicActivationInt8WeightConfig` /
`Float8DynamicActivationFloat8WeightConfig` give an output with no gradient at all (the activation is rounded to
integers inside the op; measured with torchao 0.18: "element 0 of tensors does not require grad"), so no LoRA
before such a layer would train. torchao's own training paths define the backward (a straight-through gradient
through the rounding, itself an 8-bit matmul):
- int8_w8a8: `torchao.prototype.quantized_training.Int8MixedPrecisionTrainingConfig` with `module_swap=True`.
  Its default tensor-subclass form does NOT reach the int8 kernel in torchao 0.18: it registers F.linear as an
  aten override that never fires, so F.linear falls through to a plain matmul in the compute dtype (measured:
  no aten::_int_mm ran); the module swap calls its autograd function directly. `grad_weight=False`: the base is
  frozen. That function also `.view`s its input and its output's gradient, which fails on the non-contiguous
  tensors diffusers hands a Linear (a transposed attention output: "view size is not compatible with input
  tensor's size and stride"), so each such layer gets both made contiguous (a no-op where they already are); and
  it ignores autocast, so its input and output are cast to autocast's dtype, as F.linear's would be.
  Its int8 matmuls run on a CPU (torch._int_mm, tested here) and on CUDA (torchao's Triton kernel; no GPU
  measured it for this project yet).
- fp8_w8a8: `torchao.float8.convert_to_float8_training` (torchao's float8 training, what torchtitan uses) with
  the "rowwise" recipe (per-token activation and per-channel weight scales: one outlier token does not flatten
  the others). It needs fp8 tensor cores, CUDA compute capability 8.9+ (Ada, Hopper, Blackwell), and is refused
  on older GPUs before anything loads (`device_problems`). torch 2.13 also runs torch._scaled_mm on a CPU, slower
  than fp32 there: allowed, to check a recipe (and test it) before a GPU run. Float8Linear's backward also
  computes the frozen weight's gradient, which autograd then drops: one wasted matmul in three in eager mode
  (compiled, AOTAutograd should leave out gradients no input needs).
Only Linear layers whose in and out features are multiples of 16 change: torch._scaled_mm needs it, and the few
odd-sized ones (input projections of a handful of channels) are too small to gain.

Merging a LoRA into quantised weights gives silently wrong weights in some libraries (84-114% off was seen with
quanto and bitsandbytes nf4), and a layer that multiplies in 8 bits would not multiply the merged weight as the
training did, so fusing and extraction refuse a quantised base (`refuse_quantized`).
"""
from __future__ import annotations

import logging

import torch

WEIGHT_ONLY = {"int8": "Int8WeightOnlyConfig", "fp8": "Float8WeightOnlyConfig"}
EIGHT_BIT_MATMULS = ("int8_w8a8", "fp8_w8a8")
FP8_CAPABILITY = (8, 9)  # the first CUDA architecture with fp8 tensor cores (Ada)


def quantize_weights(module: torch.nn.Module, kind: str) -> int:
    """Quantise the Linear layers of `module` in place (`kind`: int8, fp8, int8_w8a8 or fp8_w8a8); returns how
    many changed. Weights stay frozen. Raises ImportError naming the install when torchao is missing."""
    # torchao logs each CUDA kernel library it cannot load on a machine without CUDA: not a problem here
    logging.getLogger("torchao").setLevel(logging.ERROR)
    try:
        import torchao.quantization as quantization
    except ImportError:
        raise ImportError("model.quantize needs torchao: pip install torchao "
                          "(or pip install 'finetune[quantize]')") from None
    if kind in WEIGHT_ONLY:
        linear = sum(isinstance(m, torch.nn.Linear) for m in module.modules())
        quantization.quantize_(module, getattr(quantization, WEIGHT_ONLY[kind])())
        return linear
    chosen = {name for name, m in module.named_modules() if _multiplies_in_8_bits(m)}
    if kind == "int8_w8a8":
        from torchao.prototype.quantized_training import Int8MixedPrecisionTrainingConfig

        config = Int8MixedPrecisionTrainingConfig(output=True, grad_input=True, grad_weight=False, module_swap=True)
        quantization.quantize_(module, config, filter_fn=lambda m, name: name in chosen)
        for name in chosen:
            layer = module.get_submodule(name)
            layer.register_forward_pre_hook(_input_as_linear_takes_it)
            layer.register_forward_hook(_output_as_linear_gives_it)
    elif kind == "fp8_w8a8":
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        convert_to_float8_training(module, config=Float8LinearConfig.from_recipe_name("rowwise"),
                                   module_filter_fn=lambda m, name: name in chosen)
    else:
        raise ValueError(f"model.quantize: {kind} is not one of none, int8, fp8, {', '.join(EIGHT_BIT_MATMULS)}")
    for m in module.modules():  # the swapped layers keep their Parameters; say it rather than rely on it
        if _is_torchao(m):
            m.requires_grad_(False)
    return len(chosen)


def summary_line(kind: str, count: int, denoiser_name: str) -> str:
    """The line a run prints once `quantize_weights` changed `count` Linear layers of its denoiser."""
    if kind in EIGHT_BIT_MATMULS:
        return (f"model.quantize: {count} Linear layers of the {denoiser_name} multiply in {kind.split('_')[0]} "
                "(weights kept in the base dtype)")
    return f"model.quantize: {count} Linear weights of the {denoiser_name} in {kind}"


def _multiplies_in_8_bits(module: torch.nn.Module) -> bool:
    """Whether an 8-bit matmul takes this layer: a Linear whose in and out features are multiples of 16."""
    return (isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0
            and module.out_features % 16 == 0)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _input_as_linear_takes_it(layer: torch.nn.Module, args: tuple) -> tuple:
    x, dtype = args[0], _autocast_dtype(args[0].device.type)
    return ((x if dtype is None else x.to(dtype)).contiguous(), *args[1:])


def _output_as_linear_gives_it(layer: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    dtype = _autocast_dtype(output.device.type)  # an fp32 bias would otherwise promote a bf16 product
    return _ContiguousGradient.apply(output if dtype is None else output.to(dtype))


class _ContiguousGradient(torch.autograd.Function):
    """The identity, whose backward hands the gradient on contiguous (an autograd.Function, which torch.compile
    traces, rather than a tensor hook)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, gradient: torch.Tensor) -> torch.Tensor:
        return gradient.contiguous()


def device_problems(kind: str, device_type: str, capability: tuple[int, int] | None) -> list[str]:
    """What keeps `kind` (model.quantize) from running on a device: `device_type` as torch.device.type names it,
    `capability` the CUDA compute capability (major, minor), or None off CUDA. Empty where it runs."""
    if kind != "fp8_w8a8" or device_type == "cpu":
        return []
    if device_type == "cuda" and capability is not None and tuple(capability) >= FP8_CAPABILITY:
        return []
    on = (f"this GPU's compute capability is {capability[0]}.{capability[1]}" if capability is not None
          else f"this run's device is {device_type}")
    return [f"model.quantize: fp8_w8a8 multiplies in fp8, which needs an NVIDIA GPU of compute capability 8.9 or "
            f"newer (Ada, Hopper, Blackwell), and {on}; set model.quantize: int8_w8a8 (8-bit matmuls in int8), "
            "or fp8 (fp8 storage, bf16 matmuls)"]


def problems_on(kind: str, device: torch.device) -> list[str]:
    """`device_problems` for the device a run trains on (reads its CUDA capability)."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return device_problems(kind, device.type, capability)


def _is_torchao(module: torch.nn.Module) -> bool:
    return type(module).__module__.startswith("torchao")


def is_quantized(module: torch.nn.Module) -> bool:
    """Whether `module` holds torchao's quantised weights (int8, fp8) or layers that multiply in 8 bits
    (int8_w8a8, fp8_w8a8: torchao's Linear subclasses over plain weights)."""
    return (any(type(p.data).__module__.startswith("torchao") for p in module.parameters())
            or any(_is_torchao(m) for m in module.modules()))


def refuse_quantized(module: torch.nn.Module, what: str) -> None:
    """Raise ValueError when `module` is quantised: `what` (merging, extracting) would give wrong weights."""
    if is_quantized(module):
        raise ValueError(f"{what} needs full-precision weights, and this {type(module).__name__} is quantised "
                         "(model.quantize); load the base unquantised (the LoRA file applies to it as it is)")
