"""Loss options: prediction targets, Min-SNR weighting, noise offset, gradient checkpointing."""
from __future__ import annotations


import pytest
import torch
from diffusers import DDPMScheduler

from finetune.models import ModelLoadError
from finetune.models.stable_diffusion import StableDiffusion
from finetune.recipe.load import parse_recipe
from finetune.models.ddpm import DDPMObjective
from finetune.training.loop import train
from tests.helpers import recipe_dict


def test_min_snr_weights_clip_at_gamma():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    timesteps = torch.tensor([0, 999])
    snr = DDPMObjective(scheduler, "epsilon").snr(timesteps)
    assert snr[0] > 5 and snr[1] < 5  # low noise has high SNR
    assert DDPMObjective(scheduler, "epsilon").weights(timesteps) is None  # plain MSE unless asked
    eps = DDPMObjective(scheduler, "epsilon", min_snr_gamma=5.0).weights(timesteps)
    assert eps[0].item() == pytest.approx(5.0 / snr[0].item()) and eps[1].item() == pytest.approx(1.0)
    v = DDPMObjective(scheduler, "v_prediction", min_snr_gamma=5.0).weights(timesteps)
    assert v[1].item() == pytest.approx(snr[1].item() / (snr[1].item() + 1))


def test_v_prediction_target_is_the_velocity():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 500])
    assert torch.equal(DDPMObjective(scheduler, "epsilon").target(latents, noise, t), noise)
    alpha = scheduler.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    sigma = (1 - scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(DDPMObjective(scheduler, "v_prediction").target(latents, noise, t),
                               alpha * noise - sigma * latents)


def test_the_objective_noises_as_ddpm_says_from_the_generator_alone():
    """Golden values by hand: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise, with noise then timesteps drawn from the
    step's generator in that order (so a resumed run draws the same)."""
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    noised = DDPMObjective(scheduler, "epsilon").noise(latents, torch.Generator().manual_seed(7))
    generator = torch.Generator().manual_seed(7)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, 1000, (3,), generator=generator)
    a = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    assert torch.equal(noised.timesteps, timesteps) and torch.equal(noised.target, noise)
    torch.testing.assert_close(noised.noisy, a.sqrt() * latents + (1 - a).sqrt() * noise)


def test_noise_offset_shifts_each_channel():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    latents = torch.zeros(64, 4, 8, 8)
    # epsilon: the target is the noise itself
    plain = DDPMObjective(scheduler, "epsilon").noise(latents, torch.Generator().manual_seed(0)).target
    offset = DDPMObjective(scheduler, "epsilon", noise_offset=1.0).noise(latents,
                                                                          torch.Generator().manual_seed(0)).target
    channel_means = (offset - plain).mean(dim=(2, 3))
    assert channel_means.std() > 0.5  # a per-(sample, channel) constant was added


def test_all_loss_options_train_to_a_finite_artifact(tiny_base, concept_dir, tmp_path, capsys):
    recipe = parse_recipe(recipe_dict(
        tiny_base, concept_dir, tmp_path / "out",
        model={"base": str(tiny_base), "prediction_type": "v_prediction", "min_snr_gamma": 5.0, "noise_offset": 0.1},
        train={"max_steps": 2, "gradient_checkpointing": True,
               "lr_scheduler": "cosine", "lr_warmup_steps": 1, "max_grad_norm": 0.5}))
    from safetensors.torch import load_file

    weights = load_file(train(recipe))
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_pickled_checkpoint_that_runs_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": Payload()}, path)
    with pytest.raises(ModelLoadError, match="pickle"):
        StableDiffusion().load(str(path))
    assert not (tmp_path / "pwned").exists()


def test_hub_id_while_offline_says_how_to_point_at_a_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        StableDiffusion().load("someone/not-a-real-model-xyz")
    assert "HF_HUB_OFFLINE" in str(info.value) and "local" in str(info.value)
