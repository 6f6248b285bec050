"""What every model family provides to the loop (finetune/models/base.py), checked the same way for each: a
family's file (its spec and tiny build) and its line in finetune.models.FAMILY_MODULES cover it."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune.data.dataset import uncropped_conditions
from finetune.models import family_for, specs
from finetune.models.base import adaptable_modules
from finetune.models.detect import family_of
from finetune.models.tiny import save_tiny_pipeline
from finetune.training.sampling import size_arguments
from tests.helpers import default_objective

# every family in the registry, each written as a tiny pipeline folder offline (its spec's `tiny`)
@pytest.fixture(scope="module", params=list(specs()))
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
    adapted = [name for name, _, _ in family.text_encoders(parts)]  # the ones TI and text-encoder LoRA change
    assert adapted and adapted == [name for name in parts.text_encoder_names if name in adapted]
    assert list(adaptable_modules(parts)) == [parts.denoiser_name, *parts.text_encoder_names]
    for module in parts.modules.values():
        assert not any(p.requires_grad for p in module.parameters()) and not module.training


def test_prompts_encode_to_what_the_denoiser_attends_to(family_and_parts):
    family, parts, folder = family_and_parts
    encoders = family.text_encoders(parts)
    assert encoders and all(tokenizer is not None and encoder is not None for _, tokenizer, encoder in encoders)
    conditioning = family.encode_prompts(parts, ["a red circle", "a much longer caption about a blue star"])
    states = conditioning[0] if isinstance(conditioning, tuple) else conditioning
    config = parts.denoiser.config
    # the text's width: PixArt/Sana project caption_channels to their cross_attention_dim inside the transformer;
    # HiDream's caption_channels are [T5, Llama] widths (T5's first); Krea 2 reads tapped layers (text_hidden_dim)
    channels = config.get("caption_channels")
    width = ((channels[0] if isinstance(channels, (list, tuple)) else channels) or config.get("cross_attention_dim")
             or config.get("joint_attention_dim") or config.get("text_hidden_dim")
             or config.get("context_in_dim")  # Qwen-Image 2.1's
             or config.cap_feat_dim)  # Z-Image's
    assert states.shape[0] == 2 and states.shape[-1] == width
    tokenizer = family.tokenizer_of(str(folder))  # validate's way, without the models
    assert tokenizer("a red circle").input_ids == encoders[0][1]("a red circle").input_ids
    assert family.caption_window(tokenizer, None) > 0
    if family.long_prompts:  # long-prompt chunking: SD's and SDXL's (validate refuses it elsewhere)
        assert family.caption_window(tokenizer, 150) >= 150


def test_images_become_latents_and_latents_become_predictions(family_and_parts):
    family, parts, _ = family_and_parts
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        mean, std = family.encode_image_moments(parts, pixels)
        latents = family.latents_from_moments(parts, mean, std, torch.Generator().manual_seed(0))
        again = family.encode_images(parts, pixels, torch.Generator().manual_seed(0))
        assert torch.equal(latents, again)  # the cached path draws what the uncached one draws
        objective = default_objective(family, parts)
        noised = objective.noise(latents, torch.Generator().manual_seed(1))
        prediction = family.predict(parts, noised.noisy, noised.timesteps, family.encode_prompts(parts, ["x", "y"]),
                                    uncropped_conditions(2, 32, 32))
    assert prediction.shape == noised.target.shape == latents.shape


def test_the_inference_pipeline_shares_the_parts(family_and_parts):
    family, parts, _ = family_and_parts
    pipe = family.pipeline(parts)
    assert all(getattr(pipe, name) is module for name, module in parts.modules.items())
    image = pipe(prompt=["a red circle"], num_inference_steps=1, height=32, width=32, output_type="np",
                 **size_arguments(pipe, 32, 32)).images  # Sana: drawn at 32 px, not binned to its aspect table
    assert image.shape[0] == 1 and torch.isfinite(torch.from_numpy(image)).all()


def test_a_family_not_trained_here_is_named_before_any_model_loads(tmp_path, capsys):
    """A PixArt-Sigma folder (or a PixArt single file) is told from its model_index.json or its keys; an SDXL folder
    once passed validate and train died inside diffusers with a TypeError."""
    import json

    import yaml
    from safetensors.torch import save_file

    from finetune.cli import main
    from tests.helpers import draw_concept, recipe_dict

    pixart = tmp_path / "pixart"
    pixart.mkdir()
    (pixart / "model_index.json").write_text(json.dumps({"_class_name": "PixArtSigmaPipeline"}))
    # the original PixArt (and Sana) layout, as diffusers tells it; a Sana file also holds attention_y_norm.
    single = tmp_path / "pixart.safetensors"
    save_file({"blocks.0.cross_attn.q_linear.weight": torch.zeros(1)}, str(single))
    images = draw_concept(tmp_path / "images", count=1)
    for base, name in ((pixart, "PixArt-Sigma pipeline (PixArtSigmaPipeline"),
                       (single, "Sana or PixArt checkpoint")):
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(recipe_dict(base, images, tmp_path / "out")))
        for argv in (["validate", str(recipe)], ["train", str(recipe)],
                     ["sample", "--base", str(base), "--prompt", "x", "--out", str(tmp_path / "x.png")]):
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert name in err and "finetune trains Stable Diffusion 1.x/2.x (sd)" in err and "(sdxl)" in err
            assert "Traceback" not in err


def test_options_of_another_family_are_refused_by_name(family_and_parts, tmp_path):
    """model.family chooses the model section's keys: each family's own options validate (its objective's
    included), and a key only other families read is refused naming them; keys that moved into the model section
    are refused at their old place with their new name."""
    import dataclasses

    from finetune.recipe.load import RecipeError, parse_recipe
    from finetune.recipe.schema import ModelOptions
    from finetune.recipe.typed import yaml_keys
    from tests.helpers import recipe_dict

    family, _, folder = family_and_parts
    own = set(yaml_keys(family.spec.options)) - set(yaml_keys(ModelOptions))
    assert own, family.name  # every family has options of its own (at least its objective's)
    recipe = parse_recipe(recipe_dict(folder, tmp_path, tmp_path / "out"))
    assert type(recipe.model) is family.spec.options and recipe.model.problems() == []
    others = {key for spec in specs().values() for key in yaml_keys(spec.options)} - set(yaml_keys(family.spec.options))
    for key in sorted(others):
        default = next(f for spec in specs().values() for f in dataclasses.fields(spec.options) if f.name == key)
        value = default.default if default.default is not dataclasses.MISSING else default.default_factory()
        with pytest.raises(RecipeError, match=rf"model\.{key}: an option of model\.family .*this model is "
                                              rf"{family.name}"):
            parse_recipe(recipe_dict(folder, tmp_path, tmp_path / "out", model={"base": str(folder), key: value}))
    moved = {"flow": {"shift": 3.0}, "train": {"min_snr_gamma": 5.0}}
    with pytest.raises(RecipeError) as refused:
        parse_recipe(recipe_dict(folder, tmp_path, tmp_path / "out", **moved))
    assert "flow: moved to model.flow" in str(refused.value)
    assert "train.min_snr_gamma: moved to model.min_snr_gamma" in str(refused.value)


@pytest.fixture(scope="module")
def family_folder(family_and_parts):
    return family_and_parts[0].name, family_and_parts[2]


def test_a_resumed_run_writes_what_the_uninterrupted_one_does(family_folder, tmp_path):
    """Noise, timesteps (or sigmas) and dropout come from each step's own generator, so resuming from a checkpoint
    repeats the uninterrupted run bit for bit, whatever the objective."""
    import shutil

    from safetensors.torch import load_file

    from finetune.recipe.load import parse_recipe
    from finetune.training import loop
    from finetune.training.checkpoint import checkpoints_dir
    from tests.helpers import allowed_by, draw_concept, recipe_dict, reset_accelerate

    name, folder = family_folder
    images = draw_concept(tmp_path / "images")

    def recipe(out):
        return parse_recipe(recipe_dict(folder, images, out, checkpoint={"every": 2},
                                        strategy=allowed_by(specs()[name], {"kind": "lora", "rank": 4,
                                                                            "text_encoder": True}),
                                        train={"max_steps": 4, "batch_size": 2, "learning_rate": 5e-3}))

    artifact = loop.train(recipe(tmp_path / "whole"))
    reset_accelerate()
    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    (tmp_path / "resumed" / artifact.name).unlink()
    again = loop.train(recipe(tmp_path / "resumed"), resume=str(checkpoints_dir(tmp_path / "resumed") / "step-000002"))
    reset_accelerate()
    first, second = load_file(str(artifact)), load_file(str(again))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first), name


def test_finetune_sample_draws_from_the_base_at_its_own_size(family_folder, tmp_path):
    """`finetune sample` draws a grid from every family's base; with no --resolution it draws at the model's own
    size (default_resolution, checked directly: two steps at 1024 px are too slow here)."""
    from PIL import Image

    from finetune.cli import main
    from finetune.models.base import default_guidance, default_resolution
    from tests.helpers import saved_pipeline

    name, folder = family_folder
    pipe = saved_pipeline(folder)
    assert default_resolution(pipe) >= 32, name
    # with no --guidance, the pipeline's own default (Flux.1-dev's embedded guidance is 3.5, not SD's 7.5)
    known = {"sd": 7.5, "sdxl": 5.0, "sd3": 7.0, "flux": 3.5, "zimage": 5.0, "qwen_image": 4.0, "flux2": 4.0}
    assert default_guidance(pipe) == known[name] if name in known else default_guidance(pipe) > 0
    assert main(["sample", "--base", str(folder), "--prompt", "a purple sks", "--steps", "2", "--num", "2",
                 "--resolution", "32", "--out", str(tmp_path / "grid.png")]) == 0
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size[0] >= 64 and len(set(grid.convert("L").getdata())) > 1, name  # two drawn images, not blank
