"""The flow-matching objective against diffusers' training formulas, and Stable Diffusion 3 through the shared loop
on a tiny SD3 built from configs (finetune/models/tiny_transformers.py). What every family shares is in
test_family_contract.py and test_strategy_contract.py."""
from __future__ import annotations

import math

import pytest
import torch
import yaml

from finetune.models.flow_matching import FlowMatchingObjective, ResolutionShift
from finetune.models.tiny import save_tiny_pipeline
from finetune.recipe.load import parse_recipe
from tests.helpers import draw_concept, recipe_dict, train_keeping_parts, train_shipped_recipe


@pytest.mark.parametrize("weighting", ["none", "sigma_sqrt", "cosmap"])
def test_noisy_input_target_and_weights_are_the_sd3_scripts(weighting):
    """For fixed latents, noise and sigma: x_t = (1 - s) x0 + s noise, target noise - x0, and the weights of
    diffusers' compute_loss_weighting_for_sd3 (train_dreambooth_lora_sd3.py's formulas)."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 8, 8, generator=generator)
    objective = FlowMatchingObjective(sampling="uniform", weighting=weighting)
    noised = objective.noise(latents, torch.Generator().manual_seed(1))
    # the same draws by hand: noise first, then u
    again = torch.Generator().manual_seed(1)
    noise = torch.randn(latents.shape, generator=again)
    sigmas = torch.rand(3, generator=again)
    s = sigmas.view(3, 1, 1, 1)
    torch.testing.assert_close(noised.timesteps, sigmas)
    torch.testing.assert_close(noised.noisy, (1.0 - s) * latents + s * noise)
    torch.testing.assert_close(noised.target, noise - latents)
    expected = compute_loss_weighting_for_sd3(weighting, sigmas)
    weights = objective.weights(noised.timesteps)
    torch.testing.assert_close(weights if weights is not None else torch.ones(3), expected)


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal", "mode"])
def test_sigmas_are_drawn_from_the_sd3_scripts_densities(sampling):
    from diffusers.training_utils import compute_density_for_timestep_sampling

    ours = FlowMatchingObjective(sampling=sampling, logit_mean=0.3, logit_std=0.8, mode_scale=1.29)
    expected = compute_density_for_timestep_sampling(sampling if sampling != "uniform" else "none", 64,
                                                     logit_mean=0.3, logit_std=0.8, mode_scale=1.29,
                                                     generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours.draw(64, torch.Generator().manual_seed(5)), expected)
    sigmoid = FlowMatchingObjective(sampling="sigmoid", sigmoid_scale=1.5).draw(64, torch.Generator().manual_seed(5))
    torch.testing.assert_close(sigmoid, torch.sigmoid(1.5 * torch.randn(64, generator=torch.Generator().manual_seed(5))))


def test_shifts_are_the_schedulers():
    """A static shift is SD3's scheduler's (shift 3: its training sigmas); the resolution shift is FluxPipeline's
    calculate_shift followed by the scheduler's exponential time shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    static = FlowMatchEulerDiscreteScheduler(shift=3.0)
    plain = FlowMatchEulerDiscreteScheduler(shift=1.0)
    u = plain.sigmas[:-1]
    torch.testing.assert_close(FlowMatchingObjective(shift=3.0).shifted(u, 64, 64), static.sigmas[:-1])
    dynamic = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                              base_image_seq_len=256, max_image_seq_len=4096)
    mu = calculate_shift(32 * 32, 256, 4096, 0.5, 1.15)  # a 64x64 latent in 2x2 patches: 1024 tokens
    shifted = FlowMatchingObjective(resolution_shift=ResolutionShift()).shifted(u, 64, 64)
    torch.testing.assert_close(shifted, dynamic.time_shift(mu, 1.0, u))
    assert math.isclose(ResolutionShift().mu(64, 64), mu)


@pytest.fixture(scope="module")
def sd3_base(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd3", family="sd3")


def test_a_lora_file_keeps_peft_keys_for_the_transformer_and_both_clips(sd3_base, tmp_path):
    """The file keeps peft's transformer keys (converting them would make diffusers skip layers silently) and the
    CLIPs' `text_model.` level. That StableDiffusion3Pipeline.load_lora_weights puts every trained layer back is
    the strategy contract's check on every family:
    tests/contracts/test_strategy_contract.py::test_the_pipelines_own_loader_puts_back_every_trained_lora_layer."""
    from safetensors import safe_open

    recipe = parse_recipe(recipe_dict(sd3_base, draw_concept(tmp_path / "images"), tmp_path / "out",
                                      strategy={"kind": "lora", "rank": 4, "text_encoder": True},
                                      train={"max_steps": 6, "learning_rate": 5e-3, "batch_size": 2}))
    artifact, _ = train_keeping_parts(recipe)
    with safe_open(str(artifact), "pt") as handle:
        keys = list(handle.keys())
    assert {k.split(".")[0] for k in keys} == {"transformer", "text_encoder", "text_encoder_2"}
    assert any(".attn.add_q_proj.lora_A." in k for k in keys)  # the text stream's projections too


def test_without_t5_it_trains_and_samples_as_the_pipeline_allows(sd3_base, tmp_path):
    from finetune.cli import main

    recipe = recipe_dict(sd3_base, draw_concept(tmp_path / "images"), tmp_path / "out",
                         train={"max_steps": 2, "batch_size": 2}, sample={"every": 2, "prompts": ["a"], "steps": 2})
    recipe["model"]["text_encoder_3"] = "none"
    _, parts = train_keeping_parts(parse_recipe(recipe))
    assert "text_encoder_3" not in parts.modules and parts.text_encoder_names == ("text_encoder", "text_encoder_2")
    assert (tmp_path / "out" / "samples" / "step-000002.png").is_file()
    assert main(["sample", "--base", str(sd3_base), "--prompt", "a purple sks", "--steps", "2",
                 "--out", str(tmp_path / "grid.png")]) == 0


def test_validate_accepts_the_flow_options_on_sd3(sd3_base, tmp_path):
    """The other objective's options (model.min_snr_gamma) are refused by name on every family:
    tests/contracts/test_family_contract.py::test_options_of_another_family_are_refused_by_name."""
    from finetune.cli import main

    recipe = recipe_dict(sd3_base, draw_concept(tmp_path / "images", count=1), tmp_path / "out")
    recipe["model"]["flow"] = {"sigma_sampling": "mode", "shift": 2.0, "weighting": "cosmap"}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["validate", str(tmp_path / "r.yaml")]) == 0


def test_the_sd35_recipe_validates_and_trains_on_a_tiny_sd3(sd3_base, tmp_path):
    out = train_shipped_recipe("sd35_lora", sd3_base, tmp_path)
    assert (out / "pytorch_lora_weights.safetensors").is_file()
