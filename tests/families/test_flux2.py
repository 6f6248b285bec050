"""Flux.2 dev and klein through the shared loop on tiny pipelines built from configs (finetune/models/flux2.py):
training feeds the transformer what the pipeline's denoising loop feeds it, latents are the pipeline's (mode,
2x2 patchify, BatchNorm statistics) and decode through its own path, recipes validate and train. What every
family shares is in test_family_contract.py and test_strategy_contract.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from finetune.data.dataset import uncropped_conditions
from finetune.models import family_for
from finetune.models.flux2 import build_tiny
from tests.helpers import (declares_data_control, draw_concept, loaded_family, recipe_dict, recording,
                           train_shipped_recipe)

PROMPT = "a purple sks"
VARIANTS = {"dev": False, "klein": True}


@pytest.fixture(scope="module", params=list(VARIANTS))
def base(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / f"tiny-flux2-{request.param}"
    build_tiny(0, klein=VARIANTS[request.param]).save_pretrained(folder, safe_serialization=True)
    return request.param, folder


loaded = loaded_family  # (family, parts, pipeline) of a variant's folder, with model options




def test_the_base_loads_with_its_own_pipeline_class(base):
    variant, folder = base
    family, parts, pipe = loaded(folder)
    assert family.name == "flux2"
    assert type(pipe).__name__ == ("Flux2KleinPipeline" if variant == "klein" else "Flux2Pipeline")
    assert parts.extra["pipeline"] == type(pipe).__name__


@pytest.mark.parametrize("guidance", [None, 2.5])
def test_training_feeds_the_transformer_what_the_pipeline_feeds_it(base, guidance):
    """Same latents, prompt and sigma: the same tokens, text states, timestep, ids and guidance reach the
    transformer, and predict returns the pipeline's prediction in latent layout."""
    variant, folder = base
    if variant == "klein" and guidance is not None:
        pytest.skip("klein has no guidance input (refused below)")
    family, parts, pipe = loaded(folder, guidance=guidance)
    from diffusers import Flux2Pipeline

    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    outputs = []
    out_hook = parts.transformer.register_forward_hook(lambda m, a, o: outputs.append(o[0].detach().clone()))
    pipeline_calls, loop_calls = [], []
    hook = recording(parts.transformer, pipeline_calls)
    # klein: guidance_scale 1 turns its real CFG off (one call); dev: the embedded guidance training gives
    pipe(prompt=PROMPT, sigmas=[0.6], num_inference_steps=1, height=32, width=32, output_type="latent",
         latents=Flux2Pipeline._patchify_latents(latents), guidance_scale=1.0 if guidance is None else guidance)
    hook.remove()
    assert len(pipeline_calls) == 1
    sigma = pipe.scheduler.sigmas[:1]  # 0.6, shifted by the pipeline's empirical mu
    hook = recording(parts.transformer, loop_calls)
    with torch.no_grad():
        predicted = family.predict(parts, latents, sigma, family.encode_prompts(parts, [PROMPT]),
                                   uncropped_conditions(1, 32, 32))
    hook.remove()
    out_hook.remove()
    inference, training = pipeline_calls[0], loop_calls[0]
    assert training["hidden_states"].shape == (1, 16, 16)  # 4x4 tokens of 4 x 4 channels
    for key in ("hidden_states", "encoder_hidden_states", "timestep", "txt_ids", "img_ids"):
        torch.testing.assert_close(training[key], inference[key], rtol=0, atol=0, msg=key)
    assert inference["encoder_hidden_states"].shape == (1, 512, 48)
    if variant == "klein":
        assert training["guidance"] is None and inference["guidance"] is None
    else:
        torch.testing.assert_close(training["guidance"], inference["guidance"], rtol=0, atol=0)
        assert float(training["guidance"][0]) == (1.0 if guidance is None else guidance)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
    tokens = outputs[0].transpose(1, 2).reshape(1, 16, 4, 4)
    torch.testing.assert_close(predicted, Flux2Pipeline._unpatchify_latents(tokens), rtol=0, atol=0)


def test_latents_are_the_pipelines_and_decode_through_its_own_path(base):
    """encode_images: the VAE's mode, patchified and normalised by its BatchNorm statistics, as the pipeline's
    _encode_vae_image (and the diffusers script) computes it, whatever the generator; the cached path (moments)
    gives the same; and the pipeline, stepping with a zero velocity, decodes them back to the VAE's own decode."""
    from diffusers import Flux2Pipeline

    _, folder = base
    family, parts, pipe = loaded(folder)
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        latents = family.encode_images(parts, pixels, torch.Generator().manual_seed(0))
        reference = Flux2Pipeline._unpatchify_latents(pipe._encode_vae_image(pixels, None))
        mean, std = family.encode_image_moments(parts, pixels)
        cached = family.latents_from_moments(parts, mean, std, torch.Generator().manual_seed(5))
    assert latents.shape == (2, 4, 8, 8) and bool((parts.vae.bn.running_mean != 0).any())
    torch.testing.assert_close(latents, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(cached, latents, rtol=0, atol=0)
    zero = parts.transformer.register_forward_hook(lambda m, a, o: (torch.zeros_like(o[0]),))
    try:
        with torch.no_grad():
            decoded = pipe(prompt=[PROMPT, PROMPT], latents=Flux2Pipeline._patchify_latents(latents), sigmas=[0.5],
                           num_inference_steps=1, height=32, width=32, guidance_scale=1.0, output_type="pt").images
    finally:
        zero.remove()
    with torch.no_grad():
        direct = pipe.image_processor.postprocess(parts.vae.decode(mean).sample, output_type="pt")
    torch.testing.assert_close(decoded, direct, rtol=0, atol=1e-5)


def test_sigma_defaults_are_sigmoid_with_flux1s_resolution_shift(base):
    _, folder = base
    family, parts, _ = loaded(folder)
    objective = family.objective(parts)
    assert objective.sampling == "sigmoid" and objective.shift is None
    assert objective.resolution_shift.mu(128, 128) == pytest.approx(1.15)  # 1024 px: 4096 tokens
    assert objective.resolution_shift.mu(32, 32) == pytest.approx(0.5)  # 256 px: 256 tokens
    from finetune.models.flow_matching import FlowOptions

    static = family.objective(parts, family.spec.options(base=str(folder), flow=FlowOptions(shift=3.0)))
    assert static.shift == 3.0 and static.resolution_shift is None


def test_validate_refuses_guidance_on_klein_and_textual_inversion_by_name(base, tmp_path, capsys):
    from finetune.cli import main

    variant, folder = base
    recipe = recipe_dict(folder, draw_concept(tmp_path / "images", count=1), tmp_path / "out",
                         model={"family": "flux2", "guidance": 2.0})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    if variant == "klein":
        assert main(["validate", str(tmp_path / "r.yaml")]) == 2
        assert "model.guidance:" in capsys.readouterr().err
    else:
        assert main(["validate", str(tmp_path / "r.yaml")]) == 0
    recipe["model"] = {"base": str(folder), "family": "flux2"}
    recipe["strategy"] = {"kind": "textual_inversion", "placeholder_token": "<sks>", "initializer_token": "star"}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    capsys.readouterr()
    assert main(["validate", str(tmp_path / "r.yaml")]) == 2
    assert "textual inversion on flux2" in capsys.readouterr().err


def test_a_flux1_key_elsewhere_is_refused(base, tmp_path, capsys):
    """A key another family reads (Flux.1's model.guidance is flux2's too; SD's prediction_type is not)."""
    from finetune.cli import main

    _, folder = base
    recipe = recipe_dict(folder, draw_concept(tmp_path / "images", count=1), tmp_path / "out",
                         model={"family": "flux2", "prediction_type": "v_prediction"})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["validate", str(tmp_path / "r.yaml")]) == 2
    assert "prediction_type" in capsys.readouterr().err


def test_the_recipe_validates_and_trains_with_a_sample_grid(base, tmp_path):
    variant, folder = base
    name = "flux2_klein_lora" if variant == "klein" else "flux2_lora"
    out = train_shipped_recipe(name, folder, tmp_path, extra=("sample.every=2", "sample.steps=2"))
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert list(out.rglob("*.png"))


@pytest.mark.skipif(not declares_data_control(), reason="data.control (issue 38's paired data) is not declared yet")
def test_the_edit_recipe_validates_and_trains_on_its_edit_pairs(base, tmp_path):
    """recipes/flux2_edit_lora.yaml as shipped (a klein base, data_examples/star_edit's pairs), on the tiny klein."""
    variant, folder = base
    if variant != "klein":
        pytest.skip("the edit recipe trains a klein base")
    out = train_shipped_recipe("flux2_edit_lora", folder, tmp_path)
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_a_trained_lora_loads_with_the_pipelines_own_loader(base, tmp_path):
    """The file's `transformer.` keys hold the script's targets, each single block's attn.to_out included, and
    the pipeline's load_lora_weights reproduces the trained model."""
    from diffusers import DiffusionPipeline
    from safetensors import safe_open

    from finetune.recipe.load import parse_recipe
    from finetune.training import loop

    _, folder = base
    recipe = parse_recipe(recipe_dict(folder, draw_concept(tmp_path / "images"), tmp_path / "out",
                                      model={"family": "flux2"},
                                      strategy={"kind": "lora", "rank": 4},
                                      train={"max_steps": 4, "learning_rate": 5e-3, "batch_size": 2}))
    with loop.setup(recipe, family=family_for("flux2")) as run:
        loop.run_steps(run)
        artifact = loop.finish(run)
    parts = run.parts
    for module in parts.modules.values():
        module.eval()
    with safe_open(str(artifact), "pt") as handle:
        modules = {k.split(".lora_")[0] for k in handle.keys()}
    assert "transformer.single_transformer_blocks.0.attn.to_out" in modules
    assert "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj" in modules
    assert "transformer.transformer_blocks.0.attn.to_out.0" in modules

    def image(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe(prompt=PROMPT, num_inference_steps=2, guidance_scale=1.0, height=32, width=32,
                    generator=torch.Generator().manual_seed(0), output_type="np").images

    pipe = DiffusionPipeline.from_pretrained(str(folder))
    pipe.load_lora_weights(str(artifact))
    reloaded = image(pipe)
    assert np.abs(reloaded - image(DiffusionPipeline.from_pretrained(str(folder)))).max() > 1e-4
    np.testing.assert_allclose(reloaded, image(family_for("flux2").pipeline(parts)), atol=1e-5)


def test_presets_and_a_single_file_are_told(base, tmp_path):
    """The peers' target sets match the tiny transformer's Linears; a BFL single file (double_blocks and the
    single-stream modulation) is told as flux2, Flux.1's (double_blocks alone) as flux."""
    from safetensors.torch import save_file

    from finetune.models.detect import family_of
    from finetune.strategies.lora_presets import targets

    _, folder = base
    family, parts, _ = loaded(folder)
    attention = targets(family, "attention", parts.transformer)
    assert "single_transformer_blocks.0.attn.to_qkv_mlp_proj" in attention
    assert "transformer_blocks.0.attn.add_q_proj" not in attention
    everything = targets(family, "all_linear", parts.transformer)
    assert {"transformer_blocks.0.ff_context.linear_out", "single_transformer_blocks.0.attn.to_out"} <= set(everything)
    assert not any("modulation" in name or name == "proj_out" for name in everything)
    one = torch.zeros(1)
    save_file({"double_blocks.0.img_attn.qkv.weight": one, "single_stream_modulation.lin.weight": one.clone()},
              str(tmp_path / "flux2.safetensors"))
    save_file({"double_blocks.0.img_attn.qkv.weight": one}, str(tmp_path / "flux1.safetensors"))
    assert family_of(str(tmp_path / "flux2.safetensors")) == "flux2"
    assert family_of(str(tmp_path / "flux1.safetensors")) == "flux"
