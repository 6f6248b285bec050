"""`finetune extract-lora`: a whole-model fine-tune factored into a LoRA file that diffusers loads."""
from __future__ import annotations

import pytest
import torch

from finetune import load_adapter
from finetune.cli import main
from finetune.export.extract_lora import extract_lora, low_rank_factors
from finetune.recipe.load import parse_recipe
from finetune.training.loop import train
from tests.helpers import recipe_dict

FULL = 4096  # above every layer's full rank in the tiny model


def _pipe(path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(path))


@pytest.fixture(scope="module")
def perturbed(tiny_base, tmp_path_factory):
    """The tiny base with every Linear and Conv2d weight and bias of the U-Net and text encoder changed."""
    pipe = _pipe(tiny_base)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in (*pipe.unet.modules(), *pipe.text_encoder.modules()):
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                module.weight += 0.05 * torch.randn(module.weight.shape, generator=generator)
                if module.bias is not None:
                    module.bias += 0.05 * torch.randn(module.bias.shape, generator=generator)
    folder = tmp_path_factory.mktemp("tuned") / "pipeline"
    pipe.save_pretrained(folder)
    return folder


def _unet_and_text_outputs(pipe):
    generator = torch.Generator().manual_seed(1)
    ids = pipe.tokenizer(["a purple sks"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        text = pipe.text_encoder(ids)[0]
        latents = torch.randn((1, 4, 4, 4), generator=generator)
        noise = pipe.unet(latents, torch.tensor([500]), text).sample
    return text, noise


def test_full_rank_reproduces_the_tuned_model(tiny_base, perturbed, tmp_path):
    path, results = extract_lora(str(perturbed), str(tiny_base), FULL, tmp_path / "x.safetensors")
    assert set(results) == {"unet", "text_encoder"}
    assert all(r.not_carried == [] for r in results.values())  # only Linear/Conv2d weights changed
    tuned_text, tuned_noise = _unet_and_text_outputs(_pipe(perturbed))
    base_text, base_noise = _unet_and_text_outputs(_pipe(tiny_base))
    # with diffusers' own loader, as any diffusers user would load it
    pipe = _pipe(tiny_base)
    pipe.load_lora_weights(str(path))
    text, noise = _unet_and_text_outputs(pipe)
    assert not torch.allclose(base_noise, tuned_noise, atol=1e-3)  # the change is there to reproduce
    torch.testing.assert_close(text, tuned_text, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(noise, tuned_noise, atol=1e-4, rtol=1e-4)
    # and through finetune.load_adapter
    pipe = _pipe(tiny_base)
    load_adapter(pipe, path)
    torch.testing.assert_close(_unet_and_text_outputs(pipe)[1], tuned_noise, atol=1e-4, rtol=1e-4)


def test_low_rank_is_the_best_approximation():
    generator = torch.Generator().manual_seed(0)
    for shape in ((24, 16), (8, 6, 3, 3)):
        delta = torch.randn(shape, generator=generator)
        down, up = low_rank_factors(delta, 3)
        assert down.shape[0] == 3 and up.shape[1] == 3
        approx = (up.reshape(shape[0], 3) @ down.reshape(3, -1)).reshape(shape)
        singular = torch.linalg.svdvals(delta.reshape(shape[0], -1))
        # Eckart-Young: the error left is exactly the singular values dropped
        assert torch.linalg.norm(delta - approx) == pytest.approx(torch.linalg.norm(singular[3:]).item(), rel=1e-4)


def test_a_dreambooth_run_extracts_layer_for_layer(tiny_base, concept_dir, tmp_path):
    recipe = parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "db", strategy={"kind": "dreambooth"},
                                      train={"max_steps": 2, "learning_rate": 1e-3, "batch_size": 2}))
    tuned_folder = train(recipe)
    out = tmp_path / "db.safetensors"
    assert main(["extract-lora", "--tuned", str(tuned_folder), "--base", str(tiny_base), "--rank", str(FULL),
                 "--out", str(out), "--save-dtype", "fp32"]) == 0
    from finetune.io.safetensors_io import read_metadata

    header = read_metadata(out)  # the keys AUTOMATIC1111 and Forge tell the family by (test_family_header.py)
    assert header["ss_base_model_version"] == "sd_v1"
    assert header["modelspec.architecture"] == "stable-diffusion-v1/lora"
    tuned = _pipe(tuned_folder).unet
    pipe = _pipe(tiny_base)
    load_adapter(pipe, out)
    from peft.tuners.lora import LoraLayer

    adapted = {name: m for name, m in pipe.unet.named_modules() if isinstance(m, LoraLayer)}
    assert len(adapted) > 20
    generator = torch.Generator().manual_seed(2)
    for name, module in adapted.items():
        original = tuned.get_submodule(name)
        if isinstance(original, torch.nn.Conv2d):
            x = torch.randn((1, original.in_channels, 6, 6), generator=generator)
        else:
            x = torch.randn((2, original.in_features), generator=generator)
        with torch.no_grad():
            torch.testing.assert_close(module(x), original(x), atol=1e-4, rtol=1e-4, msg=name)


def test_extract_lora_names_bad_input(tiny_base, tmp_path, capsys):
    assert main(["extract-lora", "--tuned", str(tmp_path), "--base", str(tiny_base), "--out",
                 str(tmp_path / "x.safetensors")]) == 2
    assert "not a diffusers pipeline folder" in capsys.readouterr().err
    assert main(["extract-lora", "--tuned", str(tiny_base), "--base", str(tiny_base), "--out",
                 str(tmp_path / "x.safetensors")]) == 2
    assert "nothing to extract" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
