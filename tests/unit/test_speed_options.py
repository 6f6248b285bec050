"""Speed and memory options a recipe can turn on, and the benchmark scripts that measure them."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune.models.stable_diffusion import StableDiffusion
from finetune.recipe.load import parse_recipe
from finetune.training.loop import train
from tests.helpers import recipe_dict

ROOT = Path(__file__).resolve().parents[2]


def _capture_unet(monkeypatch) -> dict:
    """The U-Net as the loop trains it, caught at its first forward."""
    seen = {}
    original = StableDiffusion.predict

    def predict(self, parts, noisy, timesteps, conditioning, conditions):
        seen.setdefault("unet", parts.unet)
        seen.setdefault("noisy", noisy)
        return original(self, parts, noisy, timesteps, conditioning, conditions)

    monkeypatch.setattr(StableDiffusion, "predict", predict)
    return seen


def test_attention_runs_through_sdpa_by_default(tiny_base, concept_dir, tmp_path, monkeypatch):
    from diffusers.models.attention_processor import AttnProcessor2_0

    seen = _capture_unet(monkeypatch)
    train(parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "out", train={"max_steps": 1})))
    processors = getattr(seen["unet"], "module", seen["unet"]).attn_processors.values()
    assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors)


def test_channels_last_puts_the_unet_in_nhwc(tiny_base, concept_dir, tmp_path, monkeypatch):
    seen = _capture_unet(monkeypatch)
    train(parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "out",
                                   train={"max_steps": 2, "channels_last": True})))
    conv = getattr(seen["unet"], "module", seen["unet"]).conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


def test_compile_compiles_the_unet_in_place(tiny_base, concept_dir, tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    artifact = train(parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "out",
                                              train={"max_steps": 1, "compile": True})))
    assert len(compiled) == 1 and hasattr(compiled[0], "conv_in")  # the U-Net, compiled in place
    from safetensors.torch import load_file

    assert all("_orig_mod" not in key for key in load_file(artifact))  # saved names as without compile


def _run(script: str, *args: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{script}.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *args, "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads(out.read_text()) | {"stdout": done.stdout}


def test_step_time_benchmark_reports_floor_and_ours(tmp_path):
    figures = _run("step_time", "--model", "tiny", "--steps", "2", "--warmup", "1", tmp_path=tmp_path)
    for key in ("floor_s_per_step", "ours_s_per_step", "ratio", "floor_peak_gb", "ours_peak_gb"):
        assert figures[key] > 0, key
    assert figures["ratio"] == pytest.approx(figures["ours_s_per_step"] / figures["floor_s_per_step"])
    assert len(figures["ours_step_times"]) == len(figures["floor_step_times"]) == 2
    assert "finetune" in figures["stdout"] and "floor" in figures["stdout"]


def test_flops_benchmark_counts_each_part(tmp_path):
    figures = _run("flops", "--model", "tiny", tmp_path=tmp_path)
    unet, vae, text = (figures[f"{k}_tflop_per_sample"] for k in ("unet_fwd_bwd", "vae_encode", "text_encode"))
    assert unet > 0 and vae > 0 and text > 0
    assert figures["step_tflop_per_sample_uncached"] == pytest.approx(unet + vae + text)
    assert figures["uncached_extra_share"] == pytest.approx((vae + text) / unet)


def test_gradient_checkpointing_reaches_the_trained_text_encoder_without_a_deprecation(tiny_base):
    import warnings

    parts = StableDiffusion().load(str(tiny_base))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # transformers' old switch warns that v6 removes it
        parts.enable_gradient_checkpointing(["unet", "text_encoder"])
    assert parts.unet.is_gradient_checkpointing
    assert parts.modules["text_encoder"].is_gradient_checkpointing
