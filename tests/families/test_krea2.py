"""Krea 2 through the shared loop on a tiny Krea2Pipeline (finetune/models/krea2.py's build_tiny): training feeds the
transformer exactly what Krea2Pipeline feeds it (the [prefix | caption | PAD | suffix] tapped Qwen3-VL states and
their mask, packed latents, position ids, timestep = sigma), regresses the velocity the pipeline steps with, keeps
the Qwen-Image VAE's per-channel normalisation; ComfyUI's original Krea 2 names load back in diffusers; what Krea 2
refuses is refused by name before loading; the shipped recipe trains. What every family shares is in
test_family_contract.py and test_strategy_contract.py."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml

from finetune.data.dataset import uncropped_conditions
from finetune.models.krea2 import PACKING
from finetune.models.tiny import save_tiny_pipeline
from finetune.recipe.load import parse_recipe
from tests.helpers import draw_concept, images_of, loaded_family, recipe_dict, recording, saved_pipeline, \
    train_keeping_parts, train_shipped_recipe

PROMPTS = ["a purple sks", "a much longer caption about a purple sks on a beach"]
FED = ("hidden_states", "encoder_hidden_states", "timestep", "position_ids", "encoder_attention_mask")


@pytest.fixture(scope="module")
def krea2_base(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-krea2", family="krea2")


@pytest.fixture(scope="module")
def loaded(krea2_base):
    return loaded_family(krea2_base)




def packed(latents):
    from diffusers import Krea2Pipeline

    return Krea2Pipeline._pack_latents(PACKING, latents, *latents.shape)


def test_the_pipeline_keeps_the_bases_taps(loaded):
    """The pipeline built on the parts taps the base's layers (1, 2, 3 here), not Krea2Pipeline's default."""
    _, _, pipe = loaded
    assert pipe.text_encoder_select_layers == (1, 2, 3) and pipe.config.is_distilled is False


def test_training_feeds_the_transformer_what_the_pipeline_feeds_it(loaded):
    """For the same prompts (each encoded alone, as a text cache encodes them), noisy latents and sigma, tensor for
    tensor and dtype for dtype: packed latents, tapped states [B, 512, 3, 16], bool mask, timestep = sigma and the
    position ids (text rows zero, image rows (0, row, col))."""
    family, parts, pipe = loaded
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    pipeline_calls, loop_calls = [], []
    hook = recording(parts.transformer, pipeline_calls)
    pipe(PROMPTS, sigmas=[0.6], num_inference_steps=1, guidance_scale=0.0, height=32, width=32,  # no CFG: one call
         latents=packed(latents), output_type="latent")
    hook.remove()
    sigma = pipe.scheduler.sigmas[:1].expand(2)  # 0.6 shifted by the 4 tokens' mu
    assert 0.6 < float(sigma[0]) < 1  # e^mu > 1 even at 4 tokens: shifted towards noise
    hook = recording(parts.transformer, loop_calls)
    with torch.no_grad():
        conditioning = tuple(torch.cat(pair) for pair in zip(*(family.encode_prompts(parts, [p]) for p in PROMPTS)))
        family.predict(parts, latents, sigma, conditioning, uncropped_conditions(2, 32, 32))
    hook.remove()
    (inference,), (training,) = pipeline_calls, loop_calls
    for name in FED:
        assert training[name].dtype == inference[name].dtype, name
        torch.testing.assert_close(training[name], inference[name], rtol=0, atol=0, msg=name)
    assert training["encoder_hidden_states"].shape == (2, 512, 3, 16)
    assert training["position_ids"].shape == (512 + 4, 3) and not training["position_ids"][:512].any()
    torch.testing.assert_close(training["timestep"], sigma, rtol=0, atol=1e-7)


def test_the_mask_is_prefix_caption_pad_suffix(loaded):
    """After the 34 dropped prefix tokens: the caption's tokens, pads, then the 5 suffix tokens; the caption
    window is what fits beside the suffix."""
    family, parts, pipe = loaded
    states, mask = family.encode_prompts(parts, PROMPTS)
    assert mask.dtype == torch.bool and mask.shape == (2, 512)
    for row, prompt in zip(mask, PROMPTS):
        length = len(pipe.tokenizer(prompt).input_ids)
        assert row[:length].all() and not row[length:-5].any() and row[-5:].all()
    assert family.caption_window(pipe.tokenizer, None) == 512 - 5


def test_golden_objective_convention(loaded):
    """Hand-computed: x0 = 1, noise = 3, sigma = 0.25 give x_t = 0.75 + 0.75 = 1.5 and the target noise - x0 = 2.
    The transformer receives timestep 0.25 (sigma, not 250); predict returns its output as it is (no sign flip),
    and the pipeline's scheduler stepping x_t with that velocity from 0.25 to 0 gives 1.5 - 0.25 x 2 = 1 = x0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    family, parts, pipe = loaded
    x0, noise, sigma = torch.ones(1, 4, 4, 4), torch.full((1, 4, 4, 4), 3.0), torch.tensor([0.25])
    noisy = (1 - sigma) * x0 + sigma * noise
    assert torch.equal(noisy, torch.full_like(x0, 1.5))
    calls = []
    pre = recording(parts.transformer, calls)
    post = parts.transformer.register_forward_hook(lambda m, a, out: (packed(noise - x0),))
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
    stepped = scheduler.step(packed(velocity), scheduler.timesteps[0], packed(noisy), return_dict=False)[0]
    torch.testing.assert_close(stepped, packed(x0), rtol=0, atol=1e-6)


def test_the_predicted_velocity_steps_as_the_pipeline_steps(loaded):
    family, parts, pipe = loaded
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    stepped = {}

    def after_first(pipeline, step, timestep, kwargs):
        stepped.setdefault(step, kwargs["latents"].clone())
        return kwargs

    pipe(PROMPTS[:1], sigmas=[0.9, 0.4], num_inference_steps=2, guidance_scale=0.0, height=32, width=32,
         latents=packed(latents), output_type="latent", callback_on_step_end=after_first)
    sigmas = pipe.scheduler.sigmas
    with torch.no_grad():
        velocity = family.predict(parts, latents, sigmas[:1], family.encode_prompts(parts, PROMPTS[:1]),
                                  uncropped_conditions(1, 32, 32))
    assert velocity.shape == latents.shape and velocity.abs().mean() > 1e-3
    torch.testing.assert_close(packed(latents + (sigmas[1] - sigmas[0]) * velocity), stepped[0], rtol=0, atol=1e-5)


def test_latents_are_normalised_per_channel_and_decode_as_the_pipeline_decodes(loaded):
    family, parts, pipe = loaded
    vae = parts.vae
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        latents = family.encode_images(parts, pixels, torch.Generator().manual_seed(5))
        z = vae.encode(pixels[:, :, None]).latent_dist.sample(torch.Generator().manual_seed(5))
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    assert latents.shape == (2, 4, 4, 4) and (mean != 0).all() and (std != 1).all()
    torch.testing.assert_close(latents, ((z - mean) / std)[:, :, 0], rtol=0, atol=1e-5)
    hook = parts.transformer.register_forward_hook(lambda module, args, out: (torch.zeros_like(out[0]),))
    try:
        image = pipe(["x", "x"], num_inference_steps=1, guidance_scale=0.0, height=32, width=32,
                     latents=packed(latents), output_type="pt").images
    finally:
        hook.remove()
    with torch.no_grad():
        decoded = vae.decode(z).sample[:, :, 0]
    torch.testing.assert_close(image, pipe.image_processor.postprocess(decoded, output_type="pt"), rtol=0, atol=1e-5)


def test_default_sigmas_are_sigmoid_with_the_raw_schedulers_exponential_shift(loaded):
    from diffusers.pipelines.krea2.pipeline_krea2 import calculate_shift

    from finetune.models.flow_matching import FlowOptions, from_recipe
    from tests.helpers import default_objective

    family, parts, _ = loaded
    objective = default_objective(family, parts)
    assert objective.sampling == "sigmoid" and objective.shift is None and objective.weights(torch.tensor([.5])) is None
    u = torch.rand(16, generator=torch.Generator().manual_seed(0)).clamp(0.01, 0.99)
    for side in (64, 128):  # 512 px and 1024 px latents
        mu = calculate_shift((side // 2) ** 2, 256, 6400, 0.5, 1.15)
        torch.testing.assert_close(objective.shifted(u, side, side), math.exp(mu) / (math.exp(mu) + 1 / u - 1))
    assert abs(math.exp(calculate_shift(4096, 256, 6400, 0.5, 1.15)) - 2.475) < 0.001
    config = parts.extra["sampling_scheduler"].config
    flow = {**vars(FlowOptions()), "shift": 2.5}  # musubi's documented static shift
    static = from_recipe(flow, family.flow_defaults(flow, config), config)
    assert static.resolution_shift is None and static.shift == 2.5


def test_validate_refuses_other_families_keys_and_what_krea2_does_not_train(krea2_base, tmp_path, capsys):
    from finetune.cli import main

    recipe = recipe_dict(krea2_base, draw_concept(tmp_path / "images", count=1), tmp_path / "out")
    recipe["model"]["guidance"] = 3.5  # Flux.1's key
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["validate", str(tmp_path / "r.yaml")]) == 2
    assert "model.guidance" in capsys.readouterr().err
    del recipe["model"]["guidance"]
    for strategy, said in (({"kind": "textual_inversion", "placeholder_token": "<sks>", "initializer_token": "x"},
                            "textual inversion on krea2 is not written yet"),
                           ({"kind": "lora", "text_encoder": True}, "strategy.text_encoder: lora on krea2")):
        recipe["strategy"] = strategy
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
        assert main(["validate", str(tmp_path / "r.yaml")]) == 2
        assert said in capsys.readouterr().err
    recipe["strategy"] = {"kind": "lora", "target_preset": "authors"}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["validate", str(tmp_path / "r.yaml")]) == 0


def test_presets_and_comfyui_names_cover_the_transformer(loaded):
    """The authors' set, the attention set and every Linear; every Linear has one original Krea 2 name."""
    from finetune.export.lora.comfyui import to_original
    from finetune.export.lora.layers import LoraLayer
    from finetune.strategies.lora_presets import targets

    family, parts, _ = loaded
    every = targets(family, "all_linear", parts.transformer)
    authors = targets(family, "authors", parts.transformer)
    attention = targets(family, "attention", parts.transformer)
    assert set(attention) < set(authors) < set(every)
    assert {"img_in", "final_layer.linear", "time_mod_proj", "text_fusion.projector"} <= set(authors)
    assert "transformer_blocks.0.ff.gate" not in authors and "transformer_blocks.1.attn.to_gate" in attention
    layers = {name: LoraLayer(torch.zeros(1, 2), torch.zeros(2, 1), 1.0) for name in every}
    original = to_original(layers, family.comfyui_names)
    assert len(original) == len(every)
    assert {"blocks.0.attn.wq", "blocks.1.mlp.down", "first", "last.linear", "tmlp.0", "tproj.1", "txtmlp.3",
            "txtfusion.projector", "txtfusion.refiner_blocks.0.attn.gate"} <= set(original)


def test_a_krea2_single_file_is_told(tmp_path):
    from safetensors.torch import save_file

    from finetune.models.detect import family_of

    for prefix in ("", "model.diffusion_model."):
        save_file({f"{prefix}blocks.0.attn.wq.weight": torch.zeros(1), f"{prefix}tproj.1.weight": torch.zeros(1),
                   f"{prefix}txtfusion.projector.weight": torch.zeros(1)}, str(tmp_path / "k.safetensors"))
        assert family_of(str(tmp_path / "k.safetensors")) == "krea2"


def test_an_int8_lora_and_its_comfyui_file_load_with_the_pipelines_own_loader(krea2_base, tmp_path):
    """model.quantize: int8 trains a LoRA; Krea2Pipeline.load_lora_weights reproduces the trained model from the
    diffusers file and from the ComfyUI file (original names, its non-diffusers converter)."""
    from safetensors.torch import load_file

    from finetune.models.quantize import is_quantized

    recipe = recipe_dict(krea2_base, draw_concept(tmp_path / "images"), tmp_path / "out",
                         strategy={"kind": "lora", "rank": 4, "alpha": 8, "formats": ["diffusers", "comfyui"]},
                         train={"max_steps": 4, "learning_rate": 5e-3})
    recipe["model"]["quantize"] = "int8"
    artifact, parts = train_keeping_parts(parse_recipe(recipe))
    assert is_quantized(parts.transformer)
    [comfy] = (tmp_path / "out" / "comfyui").glob("*.safetensors")
    keys = load_file(str(comfy))
    assert "diffusion_model.blocks.0.attn.wq.lora_A.weight" in keys
    assert "diffusion_model.txtfusion.refiner_blocks.0.attn.wo.lora_B.weight" in keys
    reference = None
    for path in (artifact, comfy):
        pipe = saved_pipeline(krea2_base)
        pipe.load_lora_weights(str(path))
        got = images_of(pipe)
        if reference is None:
            reference = got
            assert np.abs(got - images_of(saved_pipeline(krea2_base))).max() > 1e-4
        np.testing.assert_allclose(got, reference, atol=1e-5)


def test_the_recipe_validates_and_trains_quantized_with_a_grid(krea2_base, tmp_path):
    out = train_shipped_recipe("krea2_lora", krea2_base, tmp_path, extra=("sample.every=2", "sample.steps=2"))
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert list((out / "samples").glob("*.png"))
