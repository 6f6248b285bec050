"""An edit run end to end (data.control): a folder of targets and a folder of their control images train a tiny
edit family (test-local: the tiny Stable Diffusion base, its spec taking one control image, its predict recording
what it is given), and predict receives, for each batch's samples in order, the VAE's mode of their own control
images, whether the latent cache is on or off; `finetune validate` counts the pairs."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from finetune.cli import main
from finetune.data import BatchOrder
from finetune.data.images import open_image, transform
from finetune.models import specs
from finetune.models.stable_diffusion import StableDiffusion
from finetune.recipe.load import parse_recipe
from finetune.training.loop import train
from tests.helpers import draw_concept, recipe_dict, reset_accelerate


class _RecordingEdit(StableDiffusion):
    """Stable Diffusion's denoiser under a spec that takes one control image; every predict's control latents kept."""

    calls: list[list[torch.Tensor]] = []

    def predict(self, parts, noisy, timesteps, conditioning, conditions):
        type(self).calls.append([latents.detach().cpu().clone() for latents in conditions["control_latents"]])
        return super().predict(parts, noisy, timesteps, conditioning, conditions)


@pytest.fixture
def edit_family(monkeypatch):
    monkeypatch.setitem(specs(), "sd", replace(specs()["sd"], control_images=1, behaviour=_RecordingEdit))
    _RecordingEdit.calls = []
    return _RecordingEdit


def _controls(folder, count: int = 4):
    """Control images of another size than their targets (48x32 for 32x32), each its own noise."""
    folder.mkdir(parents=True)
    for i in range(count):
        pixels = np.random.default_rng(50 + i).integers(0, 256, size=(32, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return folder


def _vae_modes(base, folder, count: int = 4) -> list[torch.Tensor]:
    """Each control image as training should see it: brought to its target's 32x32 (resize: target, centred), then
    the VAE's mode, normalised as SD's latents are ((z - shift) x scale), computed here with diffusers alone."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(base / "vae"))
    modes = []
    with torch.no_grad():
        for i in range(count):
            pixels = transform(open_image(str(folder / f"{i}.png")), (32, 32), "center", False)
            mode = vae.encode(pixels[None]).latent_dist.mode()[0]
            modes.append((mode - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor)
    return modes


def test_predict_receives_each_samples_own_control_latents_cached_or_not(tiny_base, tmp_path, edit_family, capsys):
    images = draw_concept(tmp_path / "images")
    controls = _controls(tmp_path / "controls")
    wanted = _vae_modes(tiny_base, controls)
    order = iter(BatchOrder(4, 1, 2, 1, 0, seed=0))
    batches = [[index for index, _ in next(order)] for _ in range(2)]  # the run's two batches, in order

    received = {}
    for cache in ("off", "memory"):
        edit_family.calls = []
        data = recipe_dict(tiny_base, images, tmp_path / cache, data={"control": {"folders": [str(controls)]}},
                           train={"max_steps": 2, "batch_size": 2}, cache={"latents": cache})
        train(parse_recipe(data))
        reset_accelerate()
        received[cache] = edit_family.calls
        assert len(received[cache]) == 2 and all(len(call) == 1 for call in received[cache])
        for call, indices in zip(received[cache], batches):
            torch.testing.assert_close(call[0], torch.stack([wanted[i] for i in indices]), rtol=1e-4, atol=1e-5)
    for cached, live in zip(received["memory"], received["off"]):
        torch.testing.assert_close(cached[0], live[0], rtol=1e-4, atol=1e-5)

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(tiny_base, images, tmp_path / "checked",
                                                 data={"control": {"folders": [str(controls)]}})))
    capsys.readouterr()
    assert main(["validate", str(recipe)]) == 0
    assert f"control images: 4 pair(s), 1 control image each (from {controls}; each at its target's size" \
        in capsys.readouterr().out


def test_held_out_images_are_scored_with_their_own_control_images(tiny_base, tmp_path, edit_family):
    """validation.images as a fraction keeps each held-out image's control images: the score's predict gets the
    held-out image's own, expanded over its fixed timesteps (a validation folder with data.control is refused by
    the recipe checks: tests/unit/test_control_pairs.py)."""
    import random

    images = draw_concept(tmp_path / "images")
    controls = _controls(tmp_path / "controls")
    wanted = _vae_modes(tiny_base, controls)
    held = random.Random(0).sample(range(4), 1)  # data/prepare.py: split_held_out, validation.seed 0
    data = recipe_dict(tiny_base, images, tmp_path / "out", data={"control": {"folders": [str(controls)]}},
                       train={"max_steps": 1, "batch_size": 1}, validation={"images": 0.25, "timesteps": 3})
    train(parse_recipe(data))
    reset_accelerate()
    calls = [call[0] for call in edit_family.calls]
    assert len(calls) == 1 + 3  # the step, then the score at the last step: 3 timesteps, one per forward (batch 1)
    assert not any(torch.allclose(calls[0][0], wanted[i], rtol=1e-4, atol=1e-5) for i in held)  # never trained on
    for scored in calls[1:]:
        torch.testing.assert_close(scored, wanted[held[0]][None], rtol=1e-4, atol=1e-5)
