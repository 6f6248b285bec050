"""HiDream-I1 through the shared loop on a tiny HiDreamImagePipeline (finetune/models/hidream.py's build_tiny):
training feeds the transformer exactly what HiDreamImagePipeline feeds it (four encoders, Llama's layers first,
timesteps sigma x 1000), regresses the negated output the pipeline steps with, in train() mode too; Flux's VAE
normalisation; refusals by name before loading; the shipped recipe trains. What every family shares is in
test_family_contract.py and test_strategy_contract.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from finetune.data.dataset import uncropped_conditions
from finetune.models.tiny import save_tiny_pipeline
from finetune.recipe.load import parse_recipe
from tests.helpers import draw_concept, loaded_family, recipe_dict, recording, saved_pipeline, train_shipped_recipe

PROMPTS = ["a purple sks", "a much longer caption about a purple sks on a beach"]
FED = ("hidden_states", "timesteps", "encoder_hidden_states_t5", "encoder_hidden_states_llama3", "pooled_embeds",
       "img_ids", "img_sizes", "hidden_states_masks")


@pytest.fixture(scope="module")
def hidream_base(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-hidream", family="hidream")


@pytest.fixture(scope="module")
def loaded(hidream_base):
    return loaded_family(hidream_base)


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["one caption", "a batch"])
def test_training_feeds_the_transformer_what_the_pipeline_feeds_it(loaded, prompts):
    """For the same prompts, latents and sigma, tensor for tensor: the latents [B, C, h, w] (patchified inside),
    timesteps = sigma x 1000 in float32, T5's states, Llama's layers `(layers, B, 128, width)`, the pooled CLIP-L ||
    CLIP-G; no ids, sizes or masks (the transformer makes them)."""
    family, parts, pipe = loaded
    batch = len(prompts)
    latents = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    pipeline_calls, loop_calls = [], []
    hook = recording(parts.transformer, pipeline_calls, keep=FED)
    pipe(prompts, sigmas=[0.6], num_inference_steps=1, guidance_scale=1.0, height=32, width=32,  # no CFG: one call
         latents=latents, output_type="latent")
    hook.remove()
    sigma = pipe.scheduler.sigmas[:1].expand(batch)  # 0.6 shifted by the scheduler's static 3.0
    hook = recording(parts.transformer, loop_calls, keep=FED)
    with torch.no_grad():
        family.predict(parts, latents, sigma, family.encode_prompts(parts, prompts),
                       uncropped_conditions(batch, 32, 32))
    hook.remove()
    (inference,), (training,) = pipeline_calls, loop_calls
    assert set(training) == set(inference)
    for name in ("hidden_states", "timesteps", "encoder_hidden_states_t5", "encoder_hidden_states_llama3",
                 "pooled_embeds"):
        assert training[name].dtype == inference[name].dtype, name
        torch.testing.assert_close(training[name], inference[name], rtol=0, atol=0, msg=name)
    assert training["encoder_hidden_states_llama3"].shape == (2, batch, 128, 16)  # layers first, as encode_prompt
    assert training["timesteps"].dtype == torch.float32
    torch.testing.assert_close(training["timesteps"], sigma * 1000, rtol=0, atol=0)  # sigma x 1000, not sigma


def test_golden_timestep_and_sign(loaded):
    """sigma 0.25, x0 = 0.5, noise = -1 everywhere: the transformer gets timesteps 250.0 and noisy 0.125; a
    transformer that predicts HiDream's `x0 - noise` exactly (1.5) makes predict return -1.5 = noise - x0, the
    velocity target the loop regresses (zero loss)."""
    family, parts, _ = loaded
    x0, noise, sigma = torch.full((1, 4, 8, 8), 0.5), torch.full((1, 4, 8, 8), -1.0), torch.tensor([0.25])
    noisy = (1 - sigma) * x0 + sigma * noise
    assert torch.equal(noisy, torch.full_like(noisy, 0.125))
    seen = {}
    transformer = parts.transformer
    real = transformer.forward

    def perfect(**kwargs):
        seen.update(kwargs)
        return (x0 - noise,)  # 1.5: what HiDream's transformer outputs at the optimum

    transformer.forward = perfect
    try:
        out = family.predict(parts, noisy, sigma, family.encode_prompts(parts, ["x"]), uncropped_conditions(1, 32, 32))
    finally:
        transformer.forward = real
    assert seen["timesteps"].tolist() == [250.0]
    assert torch.equal(seen["hidden_states"], noisy)
    assert torch.equal(out, torch.full_like(out, -1.5)) and torch.equal(out, noise - x0)


def test_the_predicted_velocity_steps_as_the_pipeline_steps(loaded):
    """x + (sigma_next - sigma) x predict(...) is the pipeline's own next latent (CFG off)."""
    family, parts, pipe = loaded
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    stepped = {}

    def after_first(pipeline, step, timestep, kwargs):
        stepped.setdefault(step, kwargs["latents"].clone())
        return kwargs

    pipe(PROMPTS[:1], sigmas=[0.9, 0.4], num_inference_steps=2, guidance_scale=1.0, height=32, width=32,
         latents=latents, output_type="latent", callback_on_step_end=after_first)
    sigmas = pipe.scheduler.sigmas
    with torch.no_grad():
        velocity = family.predict(parts, latents, sigmas[:1], family.encode_prompts(parts, PROMPTS[:1]),
                                  uncropped_conditions(1, 32, 32))
    assert velocity.shape == latents.shape and velocity.abs().mean() > 1e-3
    torch.testing.assert_close(latents + (sigmas[1] - sigmas[0]) * velocity, stepped[0], rtol=0, atol=1e-5)


def test_train_mode_predicts_what_eval_mode_predicts(hidream_base, loaded):
    """The saved (released-like) config lacks force_inference_output; loading sets it, so in train() mode the
    transformer returns the inference layout and the same numbers (the MoE routed as at inference)."""
    family, parts, _ = loaded
    assert saved_pipeline(hidream_base).transformer.config.force_inference_output is False
    assert parts.transformer.config.force_inference_output is True
    latents = torch.randn(2, 4, 8, 4, generator=torch.Generator().manual_seed(4))  # not square: masks, padding
    conditioning = family.encode_prompts(parts, PROMPTS)
    with torch.no_grad():
        evaluated = family.predict(parts, latents, torch.tensor([0.3, 0.8]), conditioning, {})
        parts.transformer.train()
        try:
            trained = family.predict(parts, latents, torch.tensor([0.3, 0.8]), conditioning, {})
        finally:
            parts.transformer.eval()
    assert trained.shape == latents.shape
    torch.testing.assert_close(trained, evaluated, rtol=0, atol=1e-6)


def test_latents_are_flux_vae_normalised_and_the_pipeline_decodes_them_back(loaded):
    family, parts, pipe = loaded
    assert (parts.vae.config.shift_factor, parts.vae.config.scaling_factor) == (0.1159, 0.3611)
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        latents = family.encode_images(parts, pixels, torch.Generator().manual_seed(0))
        z = parts.vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(0))
        expected_image = parts.vae.decode(z).sample
    torch.testing.assert_close(latents, (z - 0.1159) * 0.3611, rtol=0, atol=1e-6)
    image = pipe(PROMPTS[:1], num_inference_steps=1, guidance_scale=1.0, height=32, width=32, output_type="pt",
                 callback_on_step_end=lambda *a: {"latents": latents}).images
    torch.testing.assert_close(image, (expected_image / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-5)


def test_the_pipeline_samples_at_the_size_the_transformer_config_says(hidream_base, loaded):
    """default_sample_size is not saved: finetune's pipeline reads it from max_resolution (8 here: 32 px); the
    stock pipeline rescales any size to its 1024-latent-px default area."""
    _, _, pipe = loaded
    assert pipe.default_sample_size == 8 and saved_pipeline(hidream_base).default_sample_size == 128


def test_default_sigmas_are_uniform_with_a_static_shift_of_3(loaded):
    from finetune.models.flow_matching import FlowOptions
    from tests.helpers import default_objective

    family, parts, _ = loaded
    objective = default_objective(family, parts)
    assert (objective.sampling, objective.shift, objective.resolution_shift, objective.weighting) == (
        "uniform", 3.0, None, "none")
    assert family.objective(parts, family.options(flow=FlowOptions(shift=6.0))).shift == 6.0


def test_validate_refuses_another_familys_key_and_the_refused_strategies_by_name(hidream_base, tmp_path, capsys):
    from finetune.cli import main

    images = draw_concept(tmp_path / "images", count=1)
    recipe = recipe_dict(hidream_base, images, tmp_path / "out")
    recipe["model"].update(family="hidream", guidance=3.5)  # Flux.1-dev's key: HiDream has no guidance input
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["validate", str(tmp_path / "r.yaml")]) == 2
    assert "model.guidance" in capsys.readouterr().err
    for strategy, words in (({"kind": "textual_inversion", "placeholder_token": "<sks>", "initializer_token": "x"},
                             "textual inversion on hidream is not written yet"),
                            ({"kind": "lora", "text_encoder": True}, "strategy.text_encoder")):
        recipe = recipe_dict(hidream_base, images, tmp_path / "out", strategy=strategy)
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
        assert main(["validate", str(tmp_path / "r.yaml")]) == 2
        assert words in capsys.readouterr().err


def test_a_hidream_single_file_is_told(tmp_path):
    from safetensors.torch import save_file

    from finetune.models.detect import family_of

    for prefix in ("", "model.diffusion_model."):
        keys = ("double_stream_blocks.0.block.attn1.to_q.weight", "single_stream_blocks.0.block.attn1.to_q.weight",
                "caption_projection.0.linear.weight")
        save_file({prefix + k: torch.zeros(1) for k in keys}, str(tmp_path / "hidream.safetensors"))
        assert family_of(str(tmp_path / "hidream.safetensors")) == "hidream"


def test_targets_and_presets(loaded):
    from finetune.strategies.lora_presets import targets

    family, parts, _ = loaded
    attn1 = targets(family, "attn1", parts.transformer)
    assert "double_stream_blocks.0.block.attn1.to_k_t" in attn1 and "single_stream_blocks.0.block.attn1.to_out" in attn1
    with_ff = targets(family, "attn1-ff_i", parts.transformer)
    assert set(attn1) < set(with_ff) and "single_stream_blocks.0.block.ff_i.shared_experts.w2" in with_ff
    assert not any(".experts." in n or "ff_t" in n for n in with_ff)  # routed experts never train (no_grad)


def test_an_int8_lora_loads_with_the_hidream_pipelines_own_loader(hidream_base, tmp_path):
    """model.quantize: int8 trains a LoRA on the quantised transformer; HiDreamImagePipeline.load_lora_weights puts
    it on attn1's to_q/k/v/out of both blocks (the text *_t projections untouched)."""
    from finetune.models.quantize import is_quantized
    from tests.helpers import train_keeping_parts

    recipe = recipe_dict(hidream_base, draw_concept(tmp_path / "images"), tmp_path / "out",
                         strategy={"kind": "lora", "rank": 4},
                         train={"max_steps": 4, "learning_rate": 5e-3, "batch_size": 2})
    recipe["model"]["quantize"] = "int8"
    artifact, parts = train_keeping_parts(parse_recipe(recipe))
    assert is_quantized(parts.transformer)
    pipe = saved_pipeline(hidream_base)
    pipe.default_sample_size = 8
    pipe.load_lora_weights(str(artifact))
    loaded = {n.rsplit(".lora_A", 1)[0] for n, _ in pipe.transformer.named_modules() if n.endswith(".lora_A")}
    assert loaded == {f"{blocks}.0.block.attn1.{p}" for blocks in ("double_stream_blocks", "single_stream_blocks")
                      for p in ("to_q", "to_k", "to_v", "to_out")}
    assert np.isfinite(pipe(["a purple sks"], num_inference_steps=2, height=32, width=32,
                            generator=torch.Generator().manual_seed(0), output_type="np").images).all()


def test_the_hidream_recipe_validates_and_trains_with_a_sample_grid(hidream_base, tmp_path):
    from PIL import Image

    out = train_shipped_recipe("hidream_lora", hidream_base, tmp_path, extra=("sample.every=2", "sample.steps=2"))
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert Image.open(out / "samples" / "step-000002.png").size == (32, 64)
