"""What every model family provides to the loop (finetune/models/base.py), checked the same way for each: adding a
family and a tiny offline build of it to FAMILIES covers it."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune.data.dataset import uncropped_conditions
from finetune.models import FAMILIES, family_for
from finetune.models.base import adaptable_modules
from finetune.models.detect import family_of
from finetune.models.tiny import save_tiny_pipeline

# every family in the registry, each written as a tiny pipeline folder offline (finetune/models/tiny.py)
assert set(FAMILIES) == {"sd", "sdxl"}, "a new family: add its tiny build to models/tiny.py BUILDERS"


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_and_parts(request, tmp_path_factory):
    folder = save_tiny_pipeline(tmp_path_factory.mktemp(request.param) / "base", family=request.param)
    family = family_for(request.param)
    return family, family.load(str(folder)), Path(folder)


def test_the_family_is_told_from_the_folder_before_loading(family_and_parts):
    family, _, folder = family_and_parts
    assert family_of(str(folder)) == family.name
    assert type(family_for("auto", str(folder))) is type(family)


def test_the_parts_load_frozen_and_in_eval_mode_named_as_diffusers_names_them(family_and_parts):
    family, parts, _ = family_and_parts
    assert parts.denoiser_name in ("unet", "transformer") and parts.text_encoder_names
    assert [name for name, _, _ in family.text_encoders(parts)] == list(parts.text_encoder_names)
    assert list(adaptable_modules(parts)) == [parts.denoiser_name, *parts.text_encoder_names]
    for module in parts.modules.values():
        assert not any(p.requires_grad for p in module.parameters()) and not module.training


def test_prompts_encode_to_what_the_denoiser_attends_to(family_and_parts):
    family, parts, folder = family_and_parts
    encoders = family.text_encoders(parts)
    assert encoders and all(tokenizer is not None and encoder is not None for _, tokenizer, encoder in encoders)
    conditioning = family.encode_prompts(parts, ["a red circle", "a much longer caption about a blue star"])
    states = conditioning[0] if isinstance(conditioning, tuple) else conditioning
    assert states.shape[0] == 2 and states.shape[-1] == parts.denoiser.config.cross_attention_dim
    tokenizer = family.tokenizer_of(str(folder))  # validate's way, without the models
    assert tokenizer("a red circle").input_ids == encoders[0][1]("a red circle").input_ids
    assert family.caption_window(tokenizer, None) > 0
    assert family.caption_window(tokenizer, 150) >= 150


def test_images_become_latents_and_latents_become_predictions(family_and_parts):
    family, parts, _ = family_and_parts
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        mean, std = family.encode_image_moments(parts, pixels)
        latents = family.latents_from_moments(parts, mean, std, torch.Generator().manual_seed(0))
        again = family.encode_images(parts, pixels, torch.Generator().manual_seed(0))
        assert torch.equal(latents, again)  # the cached path draws what the uncached one draws
        objective = family.objective(parts, prediction_type=None, noise_offset=0.0, min_snr_gamma=None)
        noised = objective.noise(latents, torch.Generator().manual_seed(1))
        prediction = family.predict(parts, noised.noisy, noised.timesteps, family.encode_prompts(parts, ["x", "y"]),
                                    uncropped_conditions(2, 32, 32))
    assert prediction.shape == noised.target.shape == latents.shape


def test_the_inference_pipeline_shares_the_parts(family_and_parts):
    family, parts, _ = family_and_parts
    pipe = family.pipeline(parts)
    assert all(getattr(pipe, name) is module for name, module in parts.modules.items())
    image = pipe(["a red circle"], num_inference_steps=1, height=32, width=32, output_type="np").images
    assert image.shape[0] == 1 and torch.isfinite(torch.from_numpy(image)).all()


def test_a_family_not_trained_here_is_named_before_any_model_loads(tmp_path, capsys):
    """An SD3 folder (or a Flux single file) is told from its model_index.json or its keys; an SDXL folder once
    passed validate and train died inside diffusers with a TypeError."""
    import json

    import yaml
    from safetensors.torch import save_file

    from finetune.cli import main
    from tests.conftest import draw_concept, recipe_dict

    sd3 = tmp_path / "sd3"
    sd3.mkdir()
    (sd3 / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    flux = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(1)}, str(flux))
    images = draw_concept(tmp_path / "images", count=1)
    for base, name in ((sd3, "Stable Diffusion 3 pipeline (StableDiffusion3Pipeline"), (flux, "Flux.1 checkpoint")):
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(recipe_dict(base, images, tmp_path / "out")))
        for argv in (["validate", str(recipe)], ["train", str(recipe)],
                     ["sample", "--base", str(base), "--prompt", "x", "--out", str(tmp_path / "x.png")]):
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert name in err and "finetune trains Stable Diffusion 1.x and 2.x" in err and "SDXL" in err
            assert "Traceback" not in err


def test_options_of_another_objective_are_refused_by_name(monkeypatch):
    """validate checks a recipe's objective options against the family's objective: every family here trains with
    DDPM today, so they are all accepted; a family with another objective refuses them, naming each."""
    from finetune import models

    ddpm_options = {"model.prediction_type": "v_prediction", "train.min_snr_gamma": 5.0, "train.noise_offset": 0.05}
    for family in FAMILIES:
        assert models.FAMILIES[family][2] in models.OBJECTIVE_OPTIONS
        assert models.objective_problems(family, ddpm_options) == []
    monkeypatch.setitem(models.FAMILIES, "flow", ("finetune.models.sdxl", "StableDiffusionXL", "flow_matching"))
    problems = models.objective_problems("flow", ddpm_options)
    assert len(problems) == 3 and all("only the ddpm objective reads it" in p for p in problems)
    assert models.objective_problems("flow", {"train.noise_offset": 0.0}) == []  # left at its default
