"""What every model family provides to the loop (finetune/models/base.py), checked the same way for each: adding a
family and a tiny offline build of it to FAMILIES covers it."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune.models.stable_diffusion import StableDiffusion
from finetune.models.tiny import save_tiny_pipeline

# family, and how to write a tiny pipeline folder of it offline
FAMILIES = {"sd": (StableDiffusion, save_tiny_pipeline)}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_and_parts(request, tmp_path_factory):
    family_class, build = FAMILIES[request.param]
    folder = build(tmp_path_factory.mktemp(request.param) / "base")
    family = family_class()
    return family, family.load(str(folder)), Path(folder)


def test_the_parts_load_frozen_and_in_eval_mode(family_and_parts):
    _, parts, _ = family_and_parts
    for module in (parts.vae, parts.unet, parts.text_encoder):
        assert not any(p.requires_grad for p in module.parameters()) and not module.training


def test_prompts_encode_to_what_the_denoiser_attends_to(family_and_parts):
    family, parts, folder = family_and_parts
    encoders = family.text_encoders(parts)
    assert encoders and all(tokenizer is not None and encoder is not None for _, tokenizer, encoder in encoders)
    states = family.encode_prompts(parts, ["a red circle", "a much longer caption about a blue star"])
    assert states.shape[0] == 2 and states.shape[-1] == parts.unet.config.cross_attention_dim
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
        prediction = family.predict(parts, noised.noisy, noised.timesteps, family.encode_prompts(parts, ["x", "y"]))
    assert prediction.shape == noised.target.shape == latents.shape


def test_the_inference_pipeline_shares_the_parts(family_and_parts):
    family, parts, _ = family_and_parts
    pipe = family.pipeline(parts)
    assert pipe.unet is parts.unet and pipe.text_encoder is parts.text_encoder
    image = pipe(["a red circle"], num_inference_steps=1, height=32, width=32, output_type="np").images
    assert image.shape[0] == 1 and torch.isfinite(torch.from_numpy(image)).all()


def test_a_family_not_trained_here_is_named_before_any_model_loads(tmp_path, capsys):
    """An SDXL folder (or an SDXL / SD3 / Flux single file) is told from its model_index.json or its keys; today
    an SDXL folder passed validate and train died inside diffusers with a TypeError."""
    import json

    import yaml
    from safetensors.torch import save_file

    from finetune.cli import main
    from tests.conftest import draw_concept, recipe_dict

    sdxl = tmp_path / "sdxl"
    sdxl.mkdir()
    (sdxl / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    flux = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(1)}, str(flux))
    images = draw_concept(tmp_path / "images", count=1)
    for base, name in ((sdxl, "Stable Diffusion XL pipeline (StableDiffusionXLPipeline"), (flux, "Flux.1 checkpoint")):
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(recipe_dict(base, images, tmp_path / "out")))
        for argv in (["validate", str(recipe)], ["train", str(recipe)],
                     ["sample", "--base", str(base), "--prompt", "x", "--out", str(tmp_path / "x.png")]):
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert name in err and "finetune trains Stable Diffusion 1.x and 2.x" in err and "Traceback" not in err
