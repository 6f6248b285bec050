"""Qwen-Image 2.1 through the shared loop on a tiny QwenImage21Pipeline (finetune/models/qwen_image_2_1.py's
build_tiny): training feeds the transformer exactly what QwenImage21Pipeline feeds it for a text-only prompt (Qwen3-VL
states before the final norm, the mask, flattened latents, img_shapes, img_mask, timestep = sigma), regresses the
velocity the pipeline steps with, encodes RGB pixels as the pipeline encodes an opaque RGBA image; what 2.1 refuses is
refused by name before loading; the shipped recipe trains. In-process only: the processor needs the test-only
torchvision tests/conftest.py puts on sys.path. What every family shares is in test_family_contract.py and
test_strategy_contract.py."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from finetune.data.dataset import uncropped_conditions
from finetune.models.tiny import save_tiny_pipeline
from finetune.recipe.load import parse_recipe
from tests.helpers import draw_concept, loaded_family, recipe_dict, recording, saved_pipeline, \
    train_keeping_parts, train_shipped_recipe

PROMPTS = ["a purple sks", "a much longer caption about a purple sks on a beach"]
FED = ("hidden_states", "encoder_hidden_states", "timestep", "encoder_hidden_states_mask", "img_mask")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-qwen21", family="qwen_image_2_1")


@pytest.fixture(scope="module")
def loaded(base):
    return loaded_family(base)


def flat(latents):
    """[B, C, h, w] -> the pipeline's tokens [B, h*w, C] (QwenImage21Pipeline._pack_latents: a plain flatten)."""
    from diffusers import QwenImage21Pipeline

    return QwenImage21Pipeline._pack_latents(latents, *latents.shape)


def test_training_feeds_the_transformer_what_the_pipeline_feeds_it(loaded):
    """The same prompts (a batch, as the pipeline encodes them), noisy latents and sigma: tensor for tensor and dtype
    for dtype, img_shapes too; the text states are Qwen3-VL's last layer BEFORE its final norm."""
    family, parts, pipe = loaded
    latents = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    pipeline_calls, loop_calls = [], []
    hook = recording(parts.transformer, pipeline_calls)
    pipe(PROMPTS, sigmas=[0.6], num_inference_steps=1, height=32, width=32, latents=flat(latents),
         output_type="latent")
    hook.remove()
    sigma = pipe.scheduler.sigmas[:1].expand(2)  # 0.6 shifted by the 4 tokens' mu
    hook = recording(parts.transformer, loop_calls)
    with torch.no_grad():
        family.predict(parts, latents, sigma, family.encode_prompts(parts, PROMPTS), uncropped_conditions(2, 32, 32))
    hook.remove()
    (inference,), (training,) = pipeline_calls, loop_calls
    for name in FED:
        assert training[name].dtype == inference[name].dtype, name
        torch.testing.assert_close(training[name], inference[name], rtol=0, atol=0, msg=name)
    assert training["img_shapes"] == inference["img_shapes"] == [[(1, 2, 2)]] * 2
    assert training["img_mask"][:, -1].all() and not training["img_mask"][:, :-1].any()  # one slot: 2x2 tokens
    # the states are pre-norm: the final norm applied to them gives the normed last hidden state
    text = parts.text_encoder.model.language_model
    states, mask = family.encode_prompts(parts, PROMPTS[:1])
    with torch.no_grad():
        normed = parts.text_encoder(**pipe.processor(text=[pipe.prompt_template_t2i.format(PROMPTS[0])],
                                                     return_tensors="pt"), output_hidden_states=True)
    kept = int(mask.sum())
    torch.testing.assert_close(text.norm(states[0, :kept]), normed.hidden_states[-1][0, -kept:])


def test_golden_objective_convention(loaded):
    """Hand-computed: x0 = 1, noise = 3, sigma = 0.25 give x_t = 0.75 + 0.75 = 1.5 and the target noise - x0 = 2.
    The transformer receives timestep 0.25 (sigma, not 250); predict returns its last h*w output tokens as they are
    (no sign flip), and the scheduler stepping x_t with that velocity from 0.25 to 0 gives 1.5 - 0.25 x 2 = 1 = x0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    family, parts, pipe = loaded
    x0, noise, sigma = torch.ones(1, 4, 2, 2), torch.full((1, 4, 2, 2), 3.0), torch.tensor([0.25])
    noisy = (1 - sigma) * x0 + sigma * noise
    assert torch.equal(noisy, torch.full_like(x0, 1.5))
    calls = []
    pre = recording(parts.transformer, calls)
    # the transformer's output spans text and image tokens: text rows 7, image rows the velocity
    post = parts.transformer.register_forward_hook(
        lambda m, a, out: (torch.cat([torch.full((1, out[0].shape[1] - 4, 4), 7.0), flat(noise - x0)], dim=1),))
    try:
        with torch.no_grad():
            velocity = family.predict(parts, noisy, sigma, family.encode_prompts(parts, ["x"]),
                                      uncropped_conditions(1, 32, 32))
    finally:
        pre.remove()
        post.remove()
    assert calls[0]["timestep"].tolist() == [0.25]
    assert torch.equal(velocity, torch.full_like(x0, 2.0))
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(sigmas=[0.25], mu=0.0)  # e^0 shifts nothing
    assert float(scheduler.timesteps[0]) / 1000 == 0.25
    stepped = scheduler.step(flat(velocity), scheduler.timesteps[0], flat(noisy), return_dict=False)[0]
    torch.testing.assert_close(stepped, flat(x0), rtol=0, atol=1e-6)


def test_the_predicted_velocity_steps_as_the_pipeline_steps(loaded):
    family, parts, pipe = loaded
    latents = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(3))
    stepped = {}

    def after_first(pipeline, step, timestep, kwargs):
        stepped.setdefault(step, kwargs["latents"].clone())
        return kwargs

    pipe(PROMPTS[:1], sigmas=[0.9, 0.4], num_inference_steps=2, height=32, width=32, latents=flat(latents),
         output_type="latent", callback_on_step_end=after_first, use_kv_cache=False)
    sigmas = pipe.scheduler.sigmas
    with torch.no_grad():
        velocity = family.predict(parts, latents, sigmas[:1], family.encode_prompts(parts, PROMPTS[:1]),
                                  uncropped_conditions(1, 32, 32))
    assert velocity.shape == latents.shape and velocity.abs().mean() > 1e-3
    torch.testing.assert_close(flat(latents + (sigmas[1] - sigmas[0]) * velocity), stepped[0], rtol=0, atol=1e-5)


def test_latents_are_the_pipelines_rgba_encoding_normalised_per_channel_and_decode_as_it_decodes(loaded):
    """RGB pixels get alpha 1, as the pipeline's RGBA conversion and preprocessing give an RGB image: the moments'
    mean normalised is the pipeline's own `_encode_vae_image` (the mode) of that image; the draw is
    latent_dist.sample's; the pipeline's decode inverts the normalisation."""
    family, parts, pipe = loaded
    vae = parts.vae
    array = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    pixels = torch.from_numpy(array).permute(2, 0, 1)[None].float() / 127.5 - 1
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
    with torch.no_grad():
        moments = family.encode_image_moments(parts, pixels)
        rgba = pipe.image_processor.preprocess(Image.fromarray(array).convert("RGBA"), width=32, height=32)
        theirs = pipe._encode_vae_image(rgba.unsqueeze(2), None)[:, :, 0]
        latents = family.encode_images(parts, pixels, torch.Generator().manual_seed(5))
        z = vae.encode(rgba.unsqueeze(2)).latent_dist.sample(torch.Generator().manual_seed(5))[:, :, 0]
    assert rgba.shape[1] == 4 and torch.equal(rgba[:, 3], torch.ones_like(rgba[:, 3]))
    torch.testing.assert_close((moments[0] - mean) / std, theirs, rtol=0, atol=1e-5)
    assert latents.shape == (1, 4, 2, 2) and (mean != 0).all() and (std != 1).all()
    torch.testing.assert_close(latents, (z - mean) / std, rtol=0, atol=1e-5)
    hook = parts.transformer.register_forward_hook(lambda module, args, out: (torch.zeros_like(out[0]),))
    try:
        image = pipe(["x"], num_inference_steps=1, height=32, width=32, latents=flat(latents), output_type="pt").images
    finally:
        hook.remove()
    with torch.no_grad():
        decoded = vae.decode(z[:, :, None]).sample[:, :, 0]
    torch.testing.assert_close(image, pipe.image_processor.postprocess(decoded, output_type="pt"), rtol=0, atol=1e-5)


def test_default_sigmas_are_sigmoid_shifted_by_the_unpacked_token_count_as_the_pipeline_shifts(loaded):
    from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import calculate_shift

    from finetune.models.flow_matching import FlowOptions, from_recipe
    from tests.helpers import default_objective

    family, parts, pipe = loaded
    objective = default_objective(family, parts)
    assert objective.sampling == "sigmoid" and objective.shift is None and objective.weights(torch.tensor([.5])) is None
    u = torch.rand(16, generator=torch.Generator().manual_seed(0)).clamp(0.01, 0.99)
    config = pipe.scheduler.config
    for side in (32, 64):  # 512 px and 1024 px latents: h*w tokens, not (h/2)(w/2)
        mu = calculate_shift(side * side, config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                             config.max_shift)
        torch.testing.assert_close(objective.shifted(u, side, side), math.exp(mu) / (math.exp(mu) + 1 / u - 1))
    flow = {**vars(FlowOptions()), "shift": 2.0}
    static = from_recipe(flow, family.flow_defaults(flow, config), config)
    assert static.resolution_shift is None and static.shift == 2.0


def test_captions_keep_one_length_with_their_mask(loaded):
    family, parts, pipe = loaded
    states, mask = family.encode_prompts(parts, PROMPTS)
    assert mask.dtype == torch.bool and states.shape[:2] == mask.shape == (2, 512)
    tokenizer = pipe.processor.tokenizer
    for row, prompt in zip(mask, PROMPTS):  # "<|im_start|>user\n" + caption + the assistant suffix
        length = len(tokenizer("<|im_start|>user\n" + prompt + "<|im_end|>\n<|im_start|>assistant\n").input_ids)
        assert row[:length].all() and not row[length:].any()
    assert family.caption_window(tokenizer, None) == 512 - len(
        tokenizer("<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n").input_ids)


def test_validate_refuses_other_families_keys_and_what_2_1_does_not_train(base, tmp_path, capsys):
    from finetune.cli import main

    recipe = recipe_dict(base, draw_concept(tmp_path / "images", count=1), tmp_path / "out")
    recipe["model"]["guidance"] = 3.5  # Flux.1's key
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["validate", str(tmp_path / "r.yaml")]) == 2
    assert "model.guidance" in capsys.readouterr().err
    del recipe["model"]["guidance"]
    for strategy, said in (({"kind": "textual_inversion", "placeholder_token": "<sks>", "initializer_token": "x"},
                            "textual inversion on qwen_image_2_1 is not written yet"),
                           ({"kind": "hypernetwork"}, "hypernetwork on qwen_image_2_1 is not written yet"),
                           ({"kind": "lora", "text_encoder": True}, "strategy.text_encoder: lora on qwen_image_2_1")):
        recipe["strategy"] = strategy
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
        assert main(["validate", str(tmp_path / "r.yaml")]) == 2
        assert said in capsys.readouterr().err
    recipe["strategy"] = {"kind": "lora", "target_preset": "attn-mlp"}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["validate", str(tmp_path / "r.yaml")]) == 0


def test_presets_cover_the_blocks(loaded):
    from finetune.strategies.lora_presets import targets

    family, parts, _ = loaded
    attention = targets(family, "attention", parts.transformer)
    mlp = targets(family, "attn-mlp", parts.transformer)
    every = targets(family, "all_linear", parts.transformer)
    assert set(attention) < set(mlp) <= set(every)
    assert "transformer_blocks.1.attn.to_out.0" in attention and "transformer_blocks.0.img_mlp.gate_layer" in mlp
    assert not any(name.startswith(("modulation", "img_in", "txt_in")) for name in every)


def test_a_qwen_image_2_1_single_file_is_told_from_a_qwen_image_one(tmp_path):
    from safetensors.torch import save_file

    from finetune.models.detect import family_of

    for prefix in ("", "model.diffusion_model."):
        save_file({f"{prefix}img_in.weight": torch.zeros(1), f"{prefix}txt_in.text_norm.weight": torch.zeros(1),
                   f"{prefix}modulation.1.weight": torch.zeros(1),
                   f"{prefix}transformer_blocks.0.attn.to_q.weight": torch.zeros(1)}, str(tmp_path / "q.safetensors"))
        assert family_of(str(tmp_path / "q.safetensors")) == "qwen_image_2_1"


def test_an_int8_lora_loads_with_the_pipelines_own_loader(base, tmp_path):
    """model.quantize: int8 trains a LoRA; QwenImage21Pipeline.load_lora_weights reproduces the trained model."""
    from finetune.models.quantize import is_quantized

    recipe = recipe_dict(base, draw_concept(tmp_path / "images"), tmp_path / "out",
                         train={"max_steps": 4, "learning_rate": 5e-3})
    recipe["model"]["quantize"] = "int8"
    artifact, parts = train_keeping_parts(parse_recipe(recipe))
    assert is_quantized(parts.transformer)
    pipe = saved_pipeline(base)
    pipe.load_lora_weights(str(artifact))
    got = _image(pipe)
    assert np.isfinite(got).all() and np.abs(got - _image(saved_pipeline(base))).max() > 1e-4
    # the trained model's LoRA layers (int8 base weights aside) are what the loader put back: scale x B @ A
    def delta(layer):
        adapter = next(iter(layer.lora_A))
        return layer.scaling[adapter] * layer.lora_B[adapter].weight @ layer.lora_A[adapter].weight

    loaded = dict(pipe.transformer.named_modules())
    checked = 0
    for name, module in parts.transformer.named_modules():
        if hasattr(module, "lora_A"):
            torch.testing.assert_close(delta(loaded[name]), delta(module), rtol=1e-5, atol=1e-6, msg=name)
            checked += 1
    assert checked == 2 * 4  # to_q, to_k, to_v, to_out.0 of 2 blocks


def _image(pipe):
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt=["a purple sks"], num_inference_steps=2, height=32, width=32, generator=generator,
                output_type="np").images


def test_the_recipe_validates_and_trains_quantized_with_a_grid(base, tmp_path):
    out = train_shipped_recipe("qwen_image_2_1_lora", base, tmp_path, extra=("sample.every=2", "sample.steps=2"))
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert list((out / "samples").glob("*.png"))
