"""train.attention: which SDPA kernels a run allows on which device and torch (finetune/training/attention.py),
the refusal at setup of a kernel the device cannot run, and a CPU run really restricted to the chosen one."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend
from torch.utils._python_dispatch import TorchDispatchMode

from finetune.models.stable_diffusion import StableDiffusion
from finetune.recipe.load import RecipeError, parse_recipe
from finetune.report.history import read_history
from finetune.training.attention import (AttentionKernels, allowed_backends, attention_problems, kernels_for,
                                         sdpa_kernels, summary_line, torch_release)
from finetune.training import loop
from finetune.training.run import setup
from tests.helpers import recipe_dict

FLASH, EFFICIENT, CUDNN, MATH = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                 SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH)
WITHOUT_CUDNN = [FLASH, EFFICIENT, MATH]
H100, B200, A100, RTX_5090, T4 = (9, 0), (10, 0), (8, 0), (12, 0), (7, 5)
CPU_FLASH_OP = "_scaled_dot_product_flash_attention_for_cpu"  # its backward's name starts so too


@pytest.mark.parametrize("choice, device, version, capability, expected", [
    ("auto", "cpu", "2.13.0+cpu", None, None),  # PyTorch's choice: CPU runs stay as they were
    ("auto", "cuda", "2.13.0+cu130", H100, WITHOUT_CUDNN),  # pytorch#196678, benchmarks/RESULTS.md's Flux backward
    ("auto", "cuda", "2.11.0+cu130", H100, WITHOUT_CUDNN),
    ("auto", "cuda", "2.14.0.dev20261001+cu130", H100, WITHOUT_CUDNN),  # no fixed release known
    ("auto", "cuda", "2.13.0", B200, WITHOUT_CUDNN),  # pytorch#193893
    ("auto", "cuda", "2.10.0", H100, None),  # cuDNN last in torch's order there
    ("auto", "cuda", "2.13.0", A100, None),  # not preferred on Ampere: PyTorch's choice
    ("auto", "cuda", "2.13.0", RTX_5090, None),
    ("auto", "cuda", "2.5.0", H100, WITHOUT_CUDNN),  # diffusers#9768
    ("auto", "cuda", "2.5.1", H100, None),
    ("auto", "rocm", "2.13.0", None, None),
    ("auto", "mps", "2.13.0", None, None),
    ("math", "cuda", "2.13.0", H100, [MATH]),
    ("cudnn", "cuda", "2.13.0", H100, [CUDNN]),  # an explicit choice is the user's, failures known or not
    ("efficient", "cuda", "2.13.0", A100, [EFFICIENT]),
    ("flash", "cpu", "2.13.0", None, [FLASH]),
])
def test_selection_over_choices_devices_versions_and_gpus(choice, device, version, capability, expected):
    assert allowed_backends(choice, device, version, capability) == expected


def test_torch_versions_parse_with_their_suffixes():
    assert torch_release("2.13.0+cu130") == (2, 13, 0)
    assert torch_release("2.14.0a0+git1234") == (2, 14, 0)
    assert torch_release("2.11") == (2, 11, 0)
    with pytest.raises(ValueError, match="not a torch version"):
        torch_release("nightly")


@pytest.mark.parametrize("choice, device, capability, half, refused", [
    ("efficient", "cpu", None, False, "runs on NVIDIA GPUs only"),
    ("cudnn", "cpu", None, True, "runs on NVIDIA GPUs only"),
    ("flash", "cuda", T4, True, "compute capability 8.0 or newer"),
    ("cudnn", "cuda", T4, True, "compute capability 8.0 or newer"),
    ("flash", "cuda", H100, False, "fp16/bf16 only"),
    ("cudnn", "rocm", None, True, "needs an NVIDIA GPU"),
    ("flash", "mps", None, True, "not known to run on mps"),
])
def test_a_kernel_the_device_cannot_run_is_refused_with_the_fix(choice, device, capability, half, refused):
    problems = attention_problems(choice, device, capability, half)
    assert len(problems) == 1 and refused in problems[0]
    assert problems[0].startswith(f"train.attention: {choice}") and "train.attention: auto" in problems[0]


@pytest.mark.parametrize("choice, device, capability, half", [
    ("auto", "cpu", None, False), ("math", "mps", None, False), ("flash", "cpu", None, False),
    ("math", "cpu", None, False), ("efficient", "cuda", T4, False), ("flash", "cuda", H100, True),
    ("cudnn", "cuda", A100, True), ("flash", "rocm", None, True),
])
def test_what_the_device_runs_is_accepted(choice, device, capability, half):
    assert attention_problems(choice, device, capability, half) == []


def test_the_summary_line_says_what_was_left_out_and_why():
    auto = summary_line("auto", WITHOUT_CUDNN, "2.13.0+cu130", H100)
    assert "flash, efficient, math" in auto and "cuDNN attention left out" in auto and "9.0" in auto
    assert "known to fail" in summary_line("cudnn", [CUDNN], "2.13.0+cu130", H100)
    assert "known to fail" not in summary_line("cudnn", [CUDNN], "2.13.0+cu130", A100)
    assert summary_line("auto", None, "2.13.0+cpu", None).startswith("attention: auto, PyTorch's choice")


def _attention_grad_fn(kernels: AttentionKernels) -> str:
    q = torch.randn(1, 2, 8, 4, requires_grad=True)
    with sdpa_kernels(kernels):
        return type(F.scaled_dot_product_attention(q, q, q).grad_fn).__name__


def test_the_context_restricts_the_kernel_on_the_cpu():
    flash, _ = kernels_for("flash", torch.device("cpu"), half_precision=False)
    math, _ = kernels_for("math", torch.device("cpu"), half_precision=False)
    assert _attention_grad_fn(flash) == "ScaledDotProductFlashAttentionForCpuBackward0"
    assert "Flash" not in _attention_grad_fn(math)


def test_no_allowed_kernel_stops_naming_the_setting():
    efficient = AttentionKernels("efficient", (EFFICIENT,), "")
    with pytest.raises(RuntimeError, match="train.attention: efficient: no allowed .* set train.attention: auto"):
        _attention_grad_fn(efficient)  # the CPU has no memory-efficient kernel


def test_setup_refuses_a_kernel_the_cpu_lacks_before_loading(tiny_base, concept_dir, tmp_path, monkeypatch):
    def load(*args, **kwargs):
        raise AssertionError("the base loaded before train.attention was checked")

    monkeypatch.setattr(StableDiffusion, "load", load)
    recipe = parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "out", train={"attention": "efficient"}))
    with pytest.raises(RecipeError, match="train.attention: efficient runs on NVIDIA GPUs only"):
        setup(recipe)


class _AtenOps(TorchDispatchMode):
    """The names of the aten ops dispatched inside (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.__name__)
        return func(*args, **(kwargs or {}))


def _train_losses(tiny_base, concept_dir, output_dir, attention: str, monkeypatch) -> tuple[list[float], set[str]]:
    """The run's losses and the aten ops its steps dispatched (setup's encoders, outside the steps, left out)."""
    recipe = parse_recipe(recipe_dict(tiny_base, concept_dir, output_dir,
                                      train={"max_steps": 2, "attention": attention}))
    ops = _AtenOps()

    def run_steps(run, on_step=None):
        with ops:
            original(run, on_step)

    original = loop.run_steps
    monkeypatch.setattr(loop, "run_steps", run_steps)
    loop.train(recipe)
    monkeypatch.setattr(loop, "run_steps", original)
    return [record["loss"] for record in read_history(output_dir)], ops.names


def test_a_math_run_trains_with_math_only_and_as_auto_does(tiny_base, concept_dir, tmp_path, caplog, monkeypatch):
    with caplog.at_level(logging.INFO, logger="finetune"):
        math_losses, math_ops = _train_losses(tiny_base, concept_dir, tmp_path / "math", "math", monkeypatch)
    assert "attention: math only (train.attention: math)" in caplog.text
    auto_losses, auto_ops = _train_losses(tiny_base, concept_dir, tmp_path / "auto", "auto", monkeypatch)
    assert any(name.startswith(CPU_FLASH_OP) for name in auto_ops)  # auto on a CPU: PyTorch's choice, flash
    assert not any("scaled_dot_product" in name for name in math_ops)  # math: plain matmuls and softmax
    assert len(math_losses) == len(auto_losses) == 2
    # the same sums in another order: fp32 rounding apart
    assert math_losses == pytest.approx(auto_losses, rel=1e-4, abs=1e-6)
