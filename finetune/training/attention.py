"""Which scaled_dot_product_attention kernels a run allows (`train.attention`), and the context that allows them.

diffusers' attention processors call `torch.nn.functional.scaled_dot_product_attention` (SDPA); PyTorch picks a
kernel for each call from those allowed (flash, memory-efficient, cuDNN, math). The loop's steps run inside
`sdpa_kernels` (forward, backward, and the blocks gradient checkpointing recomputes), so one choice holds for all
of training; sample grids draw with PyTorch's own choice (SDXL's VAE stays in fp32, which flash cannot take):
- `auto`: what PyTorch would pick, less cuDNN attention where it is known to fail (KNOWN_CUDNN_FAILURES);
- `flash` / `efficient` / `cudnn` / `math`: that kernel alone; one the device cannot run is refused at setup
  (`kernels_for`, before any model loads), and an attention call it cannot serve stops with the fix.
On a CPU, `auto` leaves PyTorch's choice untouched (flash there), so CPU runs stay bit-identical.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
# the oldest NVIDIA compute capability each kernel runs on (torch's sdp_utils.cpp, check_*_hardware_support);
# their newest is left to torch, which adds GPUs as it releases
MIN_CAPABILITY = {"flash": (8, 0), "efficient": (5, 0), "cudnn": (8, 0), "math": (0, 0)}
# the kernels a CPU runs in torch 2.13 (tried: efficient and cudnn find "No viable backend")
CPU_KERNELS = ("flash", "math")


@dataclass(frozen=True)
class KnownFailure:
    """cuDNN attention known to fail from torch `since` (major, minor, patch) up to `before` (None: no fixed
    release known) on the GPUs whose compute capability's major number is in `majors`."""
    since: tuple[int, int, int]
    before: tuple[int, int, int] | None
    majors: frozenset[int]
    what: str


KNOWN_CUDNN_FAILURES = (
    # 2.5.0 put cuDNN attention first on sm90 and newer; its backward gave NaN gradients in diffusers' training
    # scripts (huggingface/diffusers#9768); 2.5.1 put it last again
    KnownFailure((2, 5, 0), (2, 5, 1), frozenset({9, 10, 12}), "NaN gradients (diffusers#9768)"),
    # from 2.11 torch puts cuDNN attention first on sm90/sm100 (check_prefer_cudnn_attention, cuDNN > 9.15), and:
    # - Flux's backward at 1024 px on an H200, torch 2.11: "an illegal memory access" (benchmarks/RESULTS.md,
    #   "One NVIDIA H200"; flash, efficient and math ran);
    # - pytorch/pytorch#196678: NaN grad_q with an attention mask and seq_len % 128 == 64 on H100/H200, "regression
    #   since 2.11", reproduced with torch 2.13 / cuDNN 9.20 (huggingface/trl#7181: DPO runs going NaN on 2.13);
    # - pytorch/pytorch#193893: silently wrong outputs on B200 (sm_100), torch 2.11 and 2.13.
    # No release is known to fix all of them: no upper bound until one is measured (benchmarks/gpu_check.sh).
    KnownFailure((2, 11, 0), None, frozenset({9, 10}),
                 "illegal memory access in Flux's backward (benchmarks/RESULTS.md), NaN gradients (pytorch#196678)"),
)


@dataclass(frozen=True)
class AttentionKernels:
    """`train.attention` resolved for one device: `backends` the SDPA kernels allowed (None: PyTorch's own
    choice, nothing restricted) and `line` what the run's summary says about it."""
    choice: str
    backends: tuple[SDPBackend, ...] | None
    line: str


def torch_release(version: str) -> tuple[int, int, int]:
    """(major, minor, patch) of a torch version string: "2.13.0+cu130" -> (2, 13, 0), "2.14.0.dev2026" too."""
    found = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if found is None:
        raise ValueError(f"not a torch version: {version!r}")
    return int(found[1]), int(found[2]), int(found[3] or 0)


def known_cudnn_failure(torch_version: str, capability: tuple[int, int] | None) -> KnownFailure | None:
    """The KNOWN_CUDNN_FAILURES entry for this torch and NVIDIA GPU (None: none known, or no GPU)."""
    if capability is None:
        return None
    release = torch_release(torch_version)
    for failure in KNOWN_CUDNN_FAILURES:
        if (failure.since <= release and (failure.before is None or release < failure.before)
                and capability[0] in failure.majors):
            return failure
    return None


def allowed_backends(choice: str, device_type: str, torch_version: str,
                     capability: tuple[int, int] | None) -> list[SDPBackend] | None:
    """The SDPA kernels `choice` (train.attention) allows on a `device_type` ("cpu", "cuda", "rocm", "mps",
    ...) with `torch_version` (torch.__version__) and an NVIDIA GPU's compute `capability` (None elsewhere).
    None: PyTorch's own choice. Whether the device can run an explicit choice is `attention_problems`' question."""
    if choice != "auto":
        return [BACKENDS[choice]]
    if device_type == "cuda" and known_cudnn_failure(torch_version, capability) is not None:
        # torch's own order among the rest is kept (sdpa_kernel without set_priority)
        return [backend for name, backend in BACKENDS.items() if name != "cudnn"]
    return None


def attention_problems(choice: str, device_type: str, capability: tuple[int, int] | None,
                       half_precision: bool) -> list[str]:
    """Why the device cannot run an explicit `choice` (empty: it can). `half_precision`: attention runs in
    fp16/bf16 (mixed precision, or a half base), which flash and cuDNN attention need on a GPU."""
    if choice in ("auto", "math"):
        return []
    where = {"cpu": "the CPU", "rocm": "an AMD GPU (ROCm)"}.get(device_type, device_type)
    if device_type == "cpu" and choice not in CPU_KERNELS:
        return [f"train.attention: {choice} runs on NVIDIA GPUs only and this run is on the CPU; set "
                f"train.attention: auto (PyTorch's choice: flash on a CPU), flash or math"]
    if device_type == "rocm" and choice == "cudnn":
        return [f"train.attention: cudnn needs an NVIDIA GPU (cuDNN) and this run is on {where}; set "
                f"train.attention: auto, flash, efficient or math"]
    if device_type not in ("cpu", "cuda", "rocm"):
        return [f"train.attention: {choice} is not known to run on {where}; set train.attention: auto (PyTorch's "
                f"choice) or math"]
    if device_type == "cuda" and capability is not None and capability < MIN_CAPABILITY[choice]:
        oldest = ".".join(map(str, MIN_CAPABILITY[choice]))
        return [f"train.attention: {choice} needs an NVIDIA GPU of compute capability {oldest} or newer and this "
                f"one has {capability[0]}.{capability[1]}; set train.attention: auto (PyTorch picks what this "
                f"GPU runs), efficient or math"]
    if device_type in ("cuda", "rocm") and choice in ("flash", "cudnn") and not half_precision:
        return [f"train.attention: {choice} runs in fp16/bf16 only on a GPU and this run's attention is fp32 "
                f"(no mixed precision, fp32 base); set train.mixed_precision: bf16, or train.attention: auto, "
                f"efficient or math"]
    return []


def summary_line(choice: str, backends: list[SDPBackend] | None, torch_version: str,
                 capability: tuple[int, int] | None) -> str:
    """The run's one line on attention, e.g. "attention: math only (train.attention: math)"."""
    failure = known_cudnn_failure(torch_version, capability)
    gpu = f"compute capability {capability[0]}.{capability[1]}" if capability else ""
    if backends is None:
        return "attention: auto, PyTorch's choice of scaled_dot_product_attention kernel"
    names = [name for name, backend in BACKENDS.items() if backend in backends]
    if choice == "auto":
        return (f"attention: auto, PyTorch's choice among {', '.join(names)}; cuDNN attention left out on {gpu} "
                f"with torch {torch_version} ({failure.what})")
    line = f"attention: {choice} only (train.attention: {choice})"
    if choice == "cudnn" and failure is not None:
        line += f"; known to fail on {gpu} with torch {torch_version} ({failure.what}), which auto avoids"
    return line


def device_facts(device: torch.device) -> tuple[str, tuple[int, int] | None]:
    """(device type, NVIDIA compute capability or None) of the run's device; a ROCm build's "cuda" device is
    "rocm" (its capability numbers are AMD's, not NVIDIA's)."""
    if device.type != "cuda":
        return device.type, None
    if torch.version.hip:
        return "rocm", None
    return "cuda", tuple(torch.cuda.get_device_capability(device))


def kernels_for(choice: str, device: torch.device, half_precision: bool) -> tuple[AttentionKernels, list[str]]:
    """`train.attention` resolved on the run's `device` with the installed torch, and the problems that refuse
    it (attention_problems), for setup to raise before any model loads."""
    device_type, capability = device_facts(device)
    backends = allowed_backends(choice, device_type, torch.__version__, capability)
    line = summary_line(choice, backends, torch.__version__, capability)
    return (AttentionKernels(choice, None if backends is None else tuple(backends), line),
            attention_problems(choice, device_type, capability, half_precision))


# what torch says when no allowed kernel can serve a call (CUDA; CPU)
_NO_KERNEL = ("No available kernel", "No viable backend")


@contextlib.contextmanager
def sdpa_kernels(kernels: AttentionKernels) -> Iterator[None]:
    """Allow only `kernels.backends` in scaled_dot_product_attention inside (nothing changes when None).
    Raises RuntimeError naming train.attention and the fix when none of them can run a call (a flash-only run
    meeting an attention mask on a GPU, say); torch's warnings before it say why each kernel declined."""
    if kernels.backends is None:
        yield
        return
    try:
        with sdpa_kernel(list(kernels.backends)):
            yield
    except RuntimeError as exc:
        if not any(text in str(exc) for text in _NO_KERNEL):
            raise
        raise RuntimeError(f"train.attention: {kernels.choice}: no allowed scaled_dot_product_attention kernel "
                           f"can run this model's attention ({exc}); set train.attention: auto") from exc
