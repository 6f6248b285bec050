"""`model.quantize`: a LoRA trains on a denoiser quantised to 8 bits (torchao: weight-only, or multiplying in 8 bits)
and loads into the unquantised pipeline with nearly the same output; merging or extracting refuses quantised
weights; fp8 matmuls are refused on a GPU without fp8 before anything loads."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from finetune.models import family_for
from finetune.models.quantize import device_problems, is_quantized, quantize_weights, summary_line
from finetune.models.tiny import save_tiny_pipeline
from finetune.recipe.load import RecipeError, parse_recipe
from tests.helpers import (draw_concept, images_of, recipe_dict, reset_accelerate, saved_pipeline,
                           train_keeping_parts)

pytest.importorskip("torchao")


@pytest.fixture(scope="module")
def sd3_base(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd3", family="sd3")


# the kernel each 8-bit matmul kind must reach: a run that silently multiplies in bf16 fails here
EIGHT_BIT_KERNELS = {"int8_w8a8": "_int_mm", "fp8_w8a8": "_scaled_mm"}


def counting(monkeypatch, name: str) -> list:
    """Calls of torch.`name` from now on (torchao looks it up on torch at each call), one entry each."""
    calls, kernel = [], getattr(torch, name)
    monkeypatch.setattr(torch, name, lambda *a, **k: calls.append(name) or kernel(*a, **k))
    return calls


def count_base_layer_calls(parts, calls: list) -> None:
    """One entry in `calls` for each forward of the transformer's quantised (non-LoRA) Linear layers."""
    for name, layer in parts.transformer.named_modules():
        if isinstance(layer, torch.nn.Linear) and ".lora_" not in name:
            layer.register_forward_hook(lambda *_: calls.append("forward"))


# how far the full-precision base with the LoRA may draw from the quantised model it trained on, as a share of
# the LoRA's own effect (mean |full - trained| / mean |full - base| over the image); measured: int8 0.7%, fp8 3.5%,
# int8_w8a8 2.6%, fp8_w8a8 17% (each activation rounded to fp8's 3 mantissa bits, through every layer of the
# tiny model's two steps), against a LoRA effect of 7% of the image
TOLERANCE = {"int8": 0.1, "fp8": 0.1, "int8_w8a8": 0.1, "fp8_w8a8": 0.3}


@pytest.mark.parametrize("kind", ["int8", "fp8", "int8_w8a8", "fp8_w8a8"])
def test_a_lora_trained_on_a_quantised_base_applies_to_the_full_precision_one(kind, sd3_base, tmp_path,
                                                                             monkeypatch):
    recipe = recipe_dict(sd3_base, draw_concept(tmp_path / "images"), tmp_path / "out",
                         strategy={"kind": "lora", "rank": 4},
                         train={"max_steps": 8, "learning_rate": 1e-2, "batch_size": 2})
    recipe["model"]["quantize"] = kind
    kernel_calls = counting(monkeypatch, EIGHT_BIT_KERNELS[kind]) if kind in EIGHT_BIT_KERNELS else []
    forwards: list = []
    artifact, parts = train_keeping_parts(parse_recipe(recipe), lambda parts: count_base_layer_calls(parts, forwards))
    linear = {n: m for n, m in parts.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    base_layers = [m for n, m in linear.items() if ".lora_" not in n]
    adapters = [m for n, m in linear.items() if ".lora_" in n]
    assert base_layers and all(is_quantized(m) and not m.weight.requires_grad for m in base_layers)  # 8 bits
    assert adapters and all(not is_quantized(m) and type(m.weight.data) is torch.Tensor for m in adapters)
    if kind in EIGHT_BIT_KERNELS:
        # one 8-bit matmul in each base layer's forward in each of the 8 steps, and more in backward: the input
        # gradients that a LoRA before the layer needs
        assert len(forwards) >= 8 * len(base_layers) and len(kernel_calls) >= len(forwards) + 8
    trained = images_of(family_for("sd3").pipeline(parts))
    base = images_of(saved_pipeline(sd3_base))
    loaded = saved_pipeline(sd3_base)
    loaded.load_lora_weights(str(artifact))
    full = images_of(loaded)
    effect = np.abs(full - base).max()
    assert effect > 1e-3  # the LoRA changes the image
    # the full-precision base with the LoRA draws what the quantised one did, up to the quantisation's error
    assert np.abs(full - trained).mean() < TOLERANCE[kind] * np.abs(full - base).mean()


def test_the_run_says_what_multiplies_in_8_bits():
    assert summary_line("int8_w8a8", 12, "transformer") == ("model.quantize: 12 Linear layers of the transformer "
                                                            "multiply in int8 (weights kept in the base dtype)")
    assert summary_line("fp8_w8a8", 3, "unet").startswith("model.quantize: 3 Linear layers of the unet multiply in fp8")
    assert summary_line("int8", 12, "transformer") == "model.quantize: 12 Linear weights of the transformer in int8"


@pytest.mark.parametrize("strategy", [{"variant": "loha"}, {"variant": "lokr"}, {"variant": "oft"},
                                      {"use_dora": True}], ids=["loha", "lokr", "oft", "dora"])
def test_every_lora_variant_trains_in_full_precision_over_int8_matmuls(strategy, sd3_base, tmp_path, monkeypatch):
    from finetune.strategies.lora_variants import is_adapter_parameter

    recipe = recipe_dict(sd3_base, draw_concept(tmp_path / "images", count=2), tmp_path / "out",
                         strategy={"kind": "lora", "rank": 4, **strategy}, train={"max_steps": 2})
    recipe["model"]["quantize"] = "int8_w8a8"
    if strategy.get("variant") == "oft":
        del recipe["strategy"]["alpha"]  # OFT rotates, it has no scale
    kernel_calls = counting(monkeypatch, "_int_mm")
    before = {}

    def keep_adapters(parts):
        before.update({n: p.detach().clone() for n, p in parts.transformer.named_parameters() if p.requires_grad})

    _, parts = train_keeping_parts(parse_recipe(recipe), keep_adapters)
    after = dict(parts.transformer.named_parameters())
    assert before and all(is_adapter_parameter(n) and type(after[n].data) is torch.Tensor for n in before)
    assert any(not torch.equal(before[n], after[n]) for n in before)  # the adapters learned
    assert kernel_calls and is_quantized(parts.transformer)


@pytest.mark.parametrize("kind", ["int8", "fp8", "int8_w8a8", "fp8_w8a8"])
def test_merging_or_extracting_refuses_quantised_weights(kind):
    from peft import LoraConfig

    from finetune.export.extract_lora import extract_component
    from finetune.networks import peft_layers

    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 32))
    plain = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 32))
    assert quantize_weights(model, kind) == 2 and is_quantized(model) and not is_quantized(plain)
    peft_layers.inject(model, LoraConfig(r=2, target_modules=["0", "2"]))
    with pytest.raises(ValueError, match="merging an adapter needs full-precision weights"):
        peft_layers.fuse(model)
    with pytest.raises(ValueError, match="extracting a LoRA needs full-precision weights"):
        extract_component(model, plain, rank=2)


def test_8_bit_matmuls_skip_widths_fp8_cannot_multiply_and_take_strided_tensors():
    model = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.Linear(32, 48), torch.nn.Linear(48, 8))
    assert quantize_weights(model, "int8_w8a8") == 1
    assert [is_quantized(layer) for layer in model] == [False, True, False]
    # diffusers hands Linear layers transposed tensors, and gets their gradients back transposed
    x = torch.randn(2, 32, 7).transpose(1, 2).requires_grad_(True)
    out = model[1](x).transpose(1, 2)
    (out * torch.randn(out.shape)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as an unquantised Linear, it multiplies in autocast's dtype
        assert model[1](torch.randn(2, 32)).dtype == torch.bfloat16


@pytest.mark.parametrize("kind, device, capability, refused", [
    ("fp8_w8a8", "cuda", (8, 6), "compute capability is 8.6"),  # an A100 / RTX 3090 has no fp8 tensor cores
    ("fp8_w8a8", "cuda", (7, 5), "compute capability is 7.5"),
    ("fp8_w8a8", "mps", None, "device is mps"),
    ("fp8_w8a8", "cuda", (8, 9), None),  # Ada
    ("fp8_w8a8", "cuda", (9, 0), None),  # Hopper
    ("fp8_w8a8", "cuda", (10, 0), None),  # Blackwell
    ("fp8_w8a8", "cpu", None, None),  # torch._scaled_mm runs on a CPU: slow, but it checks a recipe
    ("int8_w8a8", "cuda", (8, 6), None),
    ("int8_w8a8", "cpu", None, None),
    ("fp8", "cuda", (8, 6), None),  # weight-only fp8 multiplies in bf16
    ("none", "mps", None, None),
])
def test_which_devices_multiply_in_8_bits(kind, device, capability, refused):
    problems = device_problems(kind, device, capability)
    if refused is None:
        assert problems == []
    else:
        assert len(problems) == 1 and refused in problems[0] and "model.quantize: int8_w8a8" in problems[0]


def test_setup_refuses_fp8_matmuls_on_a_gpu_without_fp8_before_the_base_loads(sd3_base, tmp_path, monkeypatch):
    from finetune.models.family import Family
    from finetune.training import loop, preflight

    recipe = recipe_dict(sd3_base, draw_concept(tmp_path / "images", count=1), tmp_path / "out")
    recipe["model"]["quantize"] = "fp8_w8a8"
    # the run's device as an RTX 3090 reports it; nothing may load
    monkeypatch.setattr(preflight, "problems_on", lambda kind, device: device_problems(kind, "cuda", (8, 6)))
    monkeypatch.setattr(Family, "load", lambda *a, **k: pytest.fail("the base loaded"))
    try:
        with pytest.raises(RecipeError, match="fp8_w8a8 multiplies in fp8, which needs an NVIDIA GPU of compute "
                                              "capability 8.9 or newer"):
            loop.setup(parse_recipe(recipe))
    finally:
        reset_accelerate()


@pytest.mark.parametrize("kind", ["int8", "int8_w8a8"])
def test_validate_refuses_quantised_dreambooth(kind, sd3_base, tmp_path, capsys):
    from finetune.cli import main

    recipe = recipe_dict(sd3_base, draw_concept(tmp_path / "images", count=1), tmp_path / "out",
                         strategy={"kind": "dreambooth"})
    recipe["model"]["quantize"] = kind
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["validate", str(tmp_path / "r.yaml")]) == 2
    assert "DreamBooth trains those weights" in capsys.readouterr().err
