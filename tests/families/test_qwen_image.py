"""Qwen-Image through the shared loop on a tiny QwenImagePipeline built from configs (finetune/models/qwen_image.py):
training feeds the transformer what the pipeline feeds it, latents are the script's and decode as the pipeline's,
the predicted velocity steps as the pipeline steps, a LoRA loads with the pipeline's own loader. What every family
shares is in test_family_contract.py and test_strategy_contract.py."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml

from finetune.data.dataset import uncropped_conditions
from finetune.models import family_for
from finetune.models.tiny import save_tiny_pipeline
from finetune.recipe.load import parse_recipe
from tests.helpers import draw_concept, images_of, loaded_family, recipe_dict, recording, saved_pipeline, \
    train_keeping_parts, train_shipped_recipe

CAPTIONS = ["a purple sks", "a much longer caption about a purple sks on a beach"]
FED = ("hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask", "timestep", "img_shapes", "guidance")


@pytest.fixture(scope="module")
def qwen_base(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-qwen-image", family="qwen_image")


@pytest.fixture(scope="module")
def loaded(qwen_base):
    return loaded_family(qwen_base)


def packed(latents):
    from diffusers import QwenImagePipeline

    return QwenImagePipeline._pack_latents(latents, *latents.shape)


@pytest.mark.parametrize("captions", [CAPTIONS[:1], CAPTIONS], ids=["one caption", "padded batch"])
def test_training_feeds_the_transformer_what_the_pipeline_feeds_it(loaded, captions):
    """For the same prompts, latents and sigma: the same packed tokens, Qwen2.5-VL states (the template's 34 tokens
    dropped, cut to the batch's longest caption), mask (None when nothing is padded), timestep (sigma), img_shapes
    and guidance (none) reach the transformer."""
    family, parts, pipe = loaded
    latents = torch.randn(len(captions), 4, 4, 4, generator=torch.Generator().manual_seed(0))
    pipeline_calls, loop_calls = [], []
    hook = recording(parts.transformer, pipeline_calls, keep=FED)
    pipe(captions, sigmas=[0.6], num_inference_steps=1, height=32, width=32, latents=packed(latents),
         output_type="latent")
    hook.remove()
    sigma = pipe.scheduler.sigmas[:1].expand(len(captions))  # 0.6 shifted by the resolution's mu
    hook = recording(parts.transformer, loop_calls, keep=FED)
    with torch.no_grad():
        family.predict(parts, latents, sigma, family.encode_prompts(parts, captions),
                       uncropped_conditions(len(captions), 32, 32))
    hook.remove()
    fed, trained = pipeline_calls[0], loop_calls[0]
    assert set(fed) == set(trained) == set(FED)
    assert (fed["encoder_hidden_states_mask"] is None) == (len(captions) == 1)
    if len(captions) > 1:
        assert fed["encoder_hidden_states_mask"].dtype == trained["encoder_hidden_states_mask"].dtype
    assert trained["img_shapes"] == fed["img_shapes"] == [[(1, 2, 2)]] * len(captions)
    assert trained["guidance"] is fed["guidance"] is None
    for name in ("hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask", "timestep"):
        torch.testing.assert_close(trained[name], fed[name], rtol=0, atol=1e-6, msg=name)
    torch.testing.assert_close(trained["timestep"], sigma, rtol=0, atol=1e-6)


def test_cached_captions_are_the_pipelines_whatever_their_batch(loaded):
    """encode_prompts pads every caption to 512 with a mask, so rows encoded in different batches (the text
    cache's) stack, and each row's unmasked tokens are encode_prompt's."""
    family, parts, pipe = loaded
    states, mask = family.encode_prompts(parts, CAPTIONS)
    assert states.shape[:2] == mask.shape == (2, 512) and mask.dtype == torch.bool
    reference, reference_mask = pipe.encode_prompt(list(CAPTIONS), max_sequence_length=512)
    for i in range(2):
        kept = reference[i][reference_mask[i].bool()]
        torch.testing.assert_close(states[i][mask[i]], kept, rtol=0, atol=1e-6)
        alone, alone_mask = family.encode_prompts(parts, [CAPTIONS[i]])
        assert torch.equal(alone_mask[0], mask[i]) and not states[i][~mask[i]].any()
        torch.testing.assert_close(alone[0], states[i], rtol=0, atol=1e-6)
    assert family.caption_window(pipe.tokenizer, None) == 512 - len(pipe.tokenizer("<|im_end|>\n<|im_start|>assistant\n").input_ids)


def test_latents_are_the_scripts_and_decode_as_the_pipeline_decodes(loaded):
    """encode_images draws what `latent_dist.sample` draws on the 5-D one-frame video and normalises it per channel
    (`(z - latents_mean) / latents_std`, the script's); the pipeline's own decode of those latents (its __call__,
    the transformer predicting zero so the step keeps them) is the VAE's decode of the drawn z."""
    family, parts, pipe = loaded
    vae = parts.vae
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        latents = family.encode_images(parts, pixels, torch.Generator().manual_seed(5))
        z = vae.encode(pixels[:, :, None]).latent_dist.sample(torch.Generator().manual_seed(5))
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    assert latents.shape == (2, 4, 4, 4) and (mean != 0).all() and (std != 1).all()  # the tiny's are not identity
    torch.testing.assert_close(latents, ((z - mean) / std)[:, :, 0], rtol=0, atol=1e-5)
    hook = parts.transformer.register_forward_hook(lambda module, args, out: (torch.zeros_like(out[0]),))
    try:
        image = pipe(["x", "x"], num_inference_steps=1, height=32, width=32, latents=packed(latents),
                     output_type="pt").images
    finally:
        hook.remove()
    with torch.no_grad():
        decoded = vae.decode(z).sample[:, :, 0]
    torch.testing.assert_close(image, pipe.image_processor.postprocess(decoded, output_type="pt"), rtol=0, atol=1e-5)


def test_the_predicted_velocity_steps_as_the_pipeline_steps(loaded):
    """The pipeline steps with the transformer's output as it is: x + (sigma_next - sigma) * predict(...) is its
    next latent, so training regresses the velocity noise - x0 that sampling integrates."""
    family, parts, pipe = loaded
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    stepped = {}

    def after_first(pipeline, step, timestep, kwargs):
        stepped.setdefault(step, kwargs["latents"].clone())
        return kwargs

    pipe(CAPTIONS[:1], sigmas=[0.9, 0.4], num_inference_steps=2, height=32, width=32, latents=packed(latents),
         output_type="latent", callback_on_step_end=after_first)
    sigmas = pipe.scheduler.sigmas
    with torch.no_grad():
        velocity = family.predict(parts, latents, sigmas[:1], family.encode_prompts(parts, CAPTIONS[:1]),
                                  uncropped_conditions(1, 32, 32))
    assert velocity.shape == latents.shape and velocity.abs().mean() > 1e-3
    torch.testing.assert_close(packed(latents + (sigmas[1] - sigmas[0]) * velocity), stepped[0], rtol=0, atol=1e-5)


def test_default_sigmas_are_sigmoid_with_the_schedulers_exponential_resolution_shift(loaded):
    """sigmoid(N(0, 1)) shifted by mu from the base's scheduler config (0.5 at 256 tokens to 0.9 at 8192), as
    QwenImagePipeline's calculate_shift and the scheduler's exponential time shift: musubi's qwen_shift. A static
    model.flow.shift alone replaces it."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    from finetune.models.flow_matching import from_recipe, FlowOptions
    from tests.helpers import default_objective

    family, parts, pipe = loaded
    objective = default_objective(family, parts)
    assert objective.sampling == "sigmoid" and objective.shift is None and objective.weights(torch.tensor([.5])) is None
    u = torch.rand(16, generator=torch.Generator().manual_seed(0)).clamp(0.01, 0.99)
    for side in (128, 166):  # 1024 px and 1328 px latents
        mu = calculate_shift((side // 2) ** 2, 256, 8192, 0.5, 0.9)
        torch.testing.assert_close(objective.shifted(u, side, side), math.exp(mu) / (math.exp(mu) + 1 / u - 1))
    config = parts.extra["sampling_scheduler"].config
    flow = {**vars(FlowOptions()), "shift": 2.2}
    static = from_recipe(flow, family.flow_defaults(flow, config), config)
    assert static.resolution_shift is None and static.shift == 2.2


def test_a_lora_loads_with_the_pipelines_own_loader(qwen_base, tmp_path):
    """The file keeps peft's `transformer.` keys for the image stream's to_q, to_k, to_v and to_out.0 (the diffusers
    script's targets, also ComfyUI's names); QwenImagePipeline.load_lora_weights reproduces what was trained."""
    from safetensors import safe_open

    recipe = parse_recipe(recipe_dict(qwen_base, draw_concept(tmp_path / "images"), tmp_path / "out",
                                      strategy={"kind": "lora", "rank": 4},
                                      train={"max_steps": 6, "learning_rate": 5e-3, "batch_size": 2}))
    artifact, parts = train_keeping_parts(recipe)
    with safe_open(str(artifact), "pt") as handle:
        modules = {k.split(".lora_")[0] for k in handle.keys()}
    assert modules == {f"transformer.transformer_blocks.{i}.attn.{p}" for i in range(2)
                       for p in ("to_q", "to_k", "to_v", "to_out.0")}
    trained = images_of(family_for("qwen_image").pipeline(parts))
    assert np.abs(trained - images_of(saved_pipeline(qwen_base))).max() > 1e-3
    pipe = saved_pipeline(qwen_base)
    pipe.load_lora_weights(str(artifact))
    np.testing.assert_allclose(images_of(pipe), trained, atol=1e-5)


def test_presets_resolve_to_the_peers_sets(loaded):
    from finetune.strategies.lora_presets import targets

    family, parts, _ = loaded
    attn_mlp = targets(family, "attn-mlp", parts.transformer)
    assert len(attn_mlp) == 2 * (8 + 4) and not any("_mod" in name for name in attn_mlp)
    assert any(name.endswith("txt_mlp.net.2") for name in attn_mlp)
    assert set(targets(family, "attention", parts.transformer)) < set(attn_mlp)
    assert any(name.endswith("img_mod.1") for name in targets(family, "all_linear", parts.transformer))


def test_sample_grids_guide_with_true_cfg(loaded):
    """Qwen-Image's guidance is real CFG (true_cfg_scale with a negative prompt): a grid runs the transformer twice
    a step, and the recipe's guidance_scale is its scale."""
    from finetune.models.base import default_guidance
    from finetune.training.sampling import sample_grid

    family, parts, pipe = loaded
    calls = []
    hook = recording(parts.transformer, calls, keep=FED)
    try:
        sample_grid(pipe, ["a purple sks"], negative_prompt="", steps=2, guidance_scale=4.0, seed=0,
                    images_per_prompt=1, resolution=32)
    finally:
        hook.remove()
    assert len(calls) == 4 and default_guidance(pipe) == 4.0


def test_class_images_guide_with_true_cfg(loaded):
    """Prior preservation's class images are drawn with the same real CFG: two transformer calls a step."""
    from finetune.data.class_images import ClassImageSpec, _draw

    family, parts, pipe = loaded
    calls = []
    hook = recording(parts.transformer, calls, keep=FED)
    try:
        _draw(pipe, ClassImageSpec("tiny", ("a shape",), 32, 0, 2, 4.0, ""), [0])
    finally:
        hook.remove()
    assert len(calls) == 4


def test_validate_refuses_other_families_keys_and_textual_inversion(qwen_base, tmp_path, capsys):
    from finetune.cli import main

    recipe = recipe_dict(qwen_base, draw_concept(tmp_path / "images", count=1), tmp_path / "out")
    recipe["model"]["guidance"] = 3.5  # Flux.1's key
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["validate", str(tmp_path / "r.yaml")]) == 2
    assert "model.guidance" in capsys.readouterr().err
    del recipe["model"]["guidance"]
    recipe["strategy"] = {"kind": "textual_inversion", "placeholder_token": "<sks>", "initializer_token": "x"}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["validate", str(tmp_path / "r.yaml")]) == 2
    assert "textual inversion on qwen_image is not written yet" in capsys.readouterr().err
    recipe["strategy"] = {"kind": "lora"}
    recipe["model"]["flow"] = {"sigma_sampling": "logit_normal", "shift": 3.0}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["validate", str(tmp_path / "r.yaml")]) == 0


def test_the_recipe_validates_and_trains_quantized_with_a_grid(qwen_base, tmp_path):
    out = train_shipped_recipe("qwen_image_lora", qwen_base, tmp_path, extra=("sample.every=2", "sample.steps=2"))
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert list((out / "samples").glob("*.png"))


def test_the_comfyui_file_keeps_the_diffusers_names_and_loads_back(qwen_base, tmp_path):
    """strategy.formats: comfyui writes `diffusion_model.` + the diffusers module paths (Qwen-Image's original
    names), alpha folded in; QwenImagePipeline.load_lora_weights and finetune.load_adapter both reproduce the
    trained model from it."""
    from safetensors.torch import load_file

    from finetune.adapters import load_adapter

    recipe = parse_recipe(recipe_dict(qwen_base, draw_concept(tmp_path / "images"), tmp_path / "out",
                                      strategy={"kind": "lora", "rank": 4, "alpha": 8,
                                                "formats": ["diffusers", "comfyui"]},
                                      train={"max_steps": 4, "learning_rate": 5e-3}))
    _, parts = train_keeping_parts(recipe)
    [path] = (tmp_path / "out" / "comfyui").glob("*.safetensors")
    tensors = load_file(str(path))
    assert "diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight" in tensors
    assert all(k.startswith("diffusion_model.transformer_blocks.") for k in tensors)
    assert not any(k.endswith(".alpha") for k in tensors)
    trained = images_of(family_for("qwen_image").pipeline(parts))
    for load in (lambda pipe: pipe.load_lora_weights(str(path)), lambda pipe: load_adapter(pipe, str(path))):
        pipe = saved_pipeline(qwen_base)
        load(pipe)
        np.testing.assert_allclose(images_of(pipe), trained, atol=1e-5)
