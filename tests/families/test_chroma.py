"""Chroma through the shared loop on a tiny ChromaPipeline (finetune/models/chroma.py's build_tiny): training feeds
the transformer exactly what ChromaPipeline feeds it (its text mask above all: every real token plus one pad),
regresses what the pipeline steps with, and keeps Flux's VAE normalisation; what Chroma refuses is refused by name
before loading; the shipped recipe trains. What every family shares is in test_family_contract.py and
test_strategy_contract.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from finetune.data.dataset import uncropped_conditions
from finetune.models import family_for
from finetune.models.tiny import save_tiny_pipeline
from finetune.recipe.load import parse_recipe
from tests.helpers import draw_concept, loaded_family, recipe_dict, recording, saved_pipeline, train_shipped_recipe

PROMPTS = ["a purple sks", "a much longer caption about a purple sks on a beach"]


@pytest.fixture(scope="module")
def chroma_base(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-chroma", family="chroma")


@pytest.fixture(scope="module")
def loaded(chroma_base):
    return loaded_family(chroma_base)




def test_training_feeds_the_transformer_what_the_pipeline_feeds_it(loaded):
    """For the same prompts, noisy latents and sigma, tensor for tensor: packed latents, T5 states, timestep =
    sigma, zero text ids, (0, row, col) image ids, and the attention mask (text: real tokens and the first pad;
    then the image tokens), dtype included."""
    from diffusers import ChromaPipeline

    family, parts, pipe = loaded
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    pipeline_calls, loop_calls = [], []
    hook = recording(parts.transformer, pipeline_calls)
    pipe(PROMPTS, sigmas=[0.6], num_inference_steps=1, guidance_scale=1.0, height=32, width=32,  # no CFG: one call
         latents=ChromaPipeline._pack_latents(latents, 2, 4, 8, 8), output_type="latent")
    hook.remove()
    sigma = pipe.scheduler.sigmas[:1].expand(2)  # 0.6, shifted by the 16 tokens' mu
    assert 0 < float(sigma[0]) < 1
    hook = recording(parts.transformer, loop_calls)
    with torch.no_grad():
        # each caption encoded alone, as a text cache may have encoded it: the rows are the batch's
        conditioning = tuple(torch.cat(pair) for pair in zip(*(family.encode_prompts(parts, [p]) for p in PROMPTS)))
        family.predict(parts, latents, sigma, conditioning, uncropped_conditions(2, 32, 32))
    hook.remove()
    (inference,), (training,) = pipeline_calls, loop_calls
    for name in ("hidden_states", "encoder_hidden_states", "txt_ids", "img_ids", "attention_mask", "timestep"):
        assert training[name].dtype == inference[name].dtype, name
        torch.testing.assert_close(training[name], inference[name], rtol=0, atol=1e-6, msg=name)
    torch.testing.assert_close(training["timestep"], sigma, rtol=0, atol=1e-6)  # sigma, not sigma x 1000
    assert training.get("guidance") is None and "pooled_projections" not in training
    # the mask: each caption's tokens (its end token included) plus one pad, zero after, ones for the 16 image tokens
    lengths = [len(pipe.tokenizer(p).input_ids) for p in PROMPTS]
    mask = training["attention_mask"]
    assert mask.shape == (2, 512 + 16)
    for row, length in zip(mask, lengths):
        assert row[:length + 1].all() and not row[length + 1:512].any() and row[512:].all()


def test_in_bf16_too_the_transformer_gets_exactly_the_pipelines_inputs(chroma_base):
    """Loaded in bf16, bit for bit: the timestep is the pipeline's (sigma x 1000 rounded to bf16) / 1000, not sigma
    rounded to bf16 (0.7234 gives 0.7227 one way, 0.7240 the other), and the mask is bf16 as the pipeline's."""
    from diffusers import ChromaPipeline

    family = family_for("chroma")
    parts = family.load(str(chroma_base), dtype=torch.bfloat16)
    pipe = family.pipeline(parts)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    calls = []
    hook = recording(parts.transformer, calls)
    pipe(PROMPTS[:1], sigmas=[0.7234], num_inference_steps=1, guidance_scale=1.0, height=32, width=32,
         latents=ChromaPipeline._pack_latents(latents, 1, 4, 8, 8), output_type="latent")
    with torch.no_grad():
        family.predict(parts, latents, pipe.scheduler.sigmas[:1], family.encode_prompts(parts, PROMPTS[:1]),
                       uncropped_conditions(1, 32, 32))
    hook.remove()
    inference, training = calls
    for name in ("hidden_states", "encoder_hidden_states", "txt_ids", "img_ids", "attention_mask", "timestep"):
        assert training[name].dtype == inference[name].dtype == torch.bfloat16, name
        assert torch.equal(training[name], inference[name]), name


def test_t5_reads_the_plain_tokenizer_mask(loaded):
    """T5 itself attends to the real tokens only (the extra pad is the transformer's alone, diffusers PR #12508):
    its states for a caption equal T5 run on the caption's tokens with the tokenizer's own mask."""
    family, parts, pipe = loaded
    states, mask = family.encode_prompts(parts, PROMPTS)
    assert states.shape == (2, 512, 32) and mask.shape == (2, 512)
    tokens = pipe.tokenizer(PROMPTS, padding="max_length", max_length=512, truncation=True, return_tensors="pt")
    with torch.no_grad():
        plain = parts.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
        extended = parts.text_encoder(tokens.input_ids, attention_mask=mask.long())[0]
    torch.testing.assert_close(states, plain, rtol=0, atol=1e-6)
    assert not torch.allclose(states, extended, atol=1e-4)
    assert torch.equal(mask.sum(1).long(), tokens.attention_mask.sum(1) + 1)


def test_the_predicted_velocity_steps_as_the_pipeline_steps(loaded):
    """x + (sigma_next - sigma) x predict(...) is the pipeline's own next latent (CFG off): training regresses
    the velocity noise - x0 that sampling integrates, unpacked to the latents' shape."""
    from diffusers import ChromaPipeline

    family, parts, pipe = loaded
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    stepped = {}

    def after_first(pipeline, step, timestep, kwargs):
        stepped.setdefault(step, kwargs["latents"].clone())
        return kwargs

    pipe(PROMPTS[:1], sigmas=[0.9, 0.4], num_inference_steps=2, guidance_scale=1.0, height=32, width=32,
         latents=ChromaPipeline._pack_latents(latents, 1, 4, 8, 8), output_type="latent",
         callback_on_step_end=after_first)
    sigmas = pipe.scheduler.sigmas
    with torch.no_grad():
        velocity = family.predict(parts, latents, sigmas[:1], family.encode_prompts(parts, PROMPTS[:1]),
                                  uncropped_conditions(1, 32, 32))
    assert velocity.shape == latents.shape and velocity.abs().mean() > 1e-3
    expected = ChromaPipeline._unpack_latents(stepped[0], 8, 8, 1)
    torch.testing.assert_close(latents + (sigmas[1] - sigmas[0]) * velocity, expected, rtol=0, atol=1e-5)


def test_latents_are_flux_vae_normalised_and_the_pipeline_decodes_them_back(loaded):
    """encode_images = (z - 0.1159) x 0.3611 of the VAE's draw (latent_dist.sample with the same generator), and
    the pipeline's own decode path (latents handed back at its last step) turns them into what the VAE decodes
    from z."""
    from diffusers import ChromaPipeline

    family, parts, pipe = loaded
    assert (parts.vae.config.shift_factor, parts.vae.config.scaling_factor) == (0.1159, 0.3611)
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        latents = family.encode_images(parts, pixels, torch.Generator().manual_seed(0))
        z = parts.vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(0))
        expected_image = parts.vae.decode(z).sample
    torch.testing.assert_close(latents, (z - 0.1159) * 0.3611, rtol=0, atol=1e-6)

    def hand_back(pipeline, step, timestep, kwargs):
        return {"latents": ChromaPipeline._pack_latents(latents, 1, 4, 8, 8)}

    image = pipe(PROMPTS[:1], num_inference_steps=1, guidance_scale=1.0, height=32, width=32, output_type="pt",
                 callback_on_step_end=hand_back).images
    torch.testing.assert_close(image, (expected_image / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-5)


def test_default_sigmas_are_sigmoid_shifted_by_the_token_count(loaded):
    """Sigmoid sampling shifted as the base's scheduler config shifts ChromaPipeline's sampling (dynamic here:
    mu from the image's token count, FluxPipeline's calculate_shift); a static model.flow.shift replaces it."""
    from finetune.models.flow_matching import FlowOptions
    from tests.helpers import default_objective

    family, parts, _ = loaded
    objective = default_objective(family, parts)
    assert (objective.sampling, objective.shift, objective.weighting) == ("sigmoid", None, "none")
    assert objective.resolution_shift is not None and objective.resolution_shift.mu(128, 128) == pytest.approx(1.15)
    static = family.objective(parts, family.options(flow=FlowOptions(shift=3.0)))
    assert (static.shift, static.resolution_shift) == (3.0, None)


def test_validate_refuses_another_familys_key_and_textual_inversion_by_name(chroma_base, tmp_path, capsys):
    from finetune.cli import main

    images = draw_concept(tmp_path / "images", count=1)
    recipe = recipe_dict(chroma_base, images, tmp_path / "out")
    recipe["model"].update(family="chroma", guidance=3.5)  # Flux.1-dev's key: Chroma has no guidance input
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["validate", str(tmp_path / "r.yaml")]) == 2
    assert "model.guidance" in capsys.readouterr().err
    recipe = recipe_dict(chroma_base, images, tmp_path / "out",
                         strategy={"kind": "textual_inversion", "placeholder_token": "<sks>", "initializer_token": "x"})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["validate", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err
    assert "textual inversion on chroma is not written yet" in err and "T5-XXL is its only text encoder" in err


def test_a_chroma_single_file_is_told_from_flux_ones(tmp_path):
    """BFL's double blocks alone are Flux.1; with the distilled_guidance_layer they are Chroma (ComfyUI's
    `model.diffusion_model.` prefix or not)."""
    from safetensors.torch import save_file

    from finetune.models.detect import family_of

    for prefix in ("", "model.diffusion_model."):
        save_file({f"{prefix}double_blocks.0.img_attn.qkv.weight": torch.zeros(1)}, str(tmp_path / "flux.safetensors"))
        save_file({f"{prefix}double_blocks.0.img_attn.qkv.weight": torch.zeros(1),
                   f"{prefix}distilled_guidance_layer.in_proj.bias": torch.zeros(1)},
                  str(tmp_path / "chroma.safetensors"))
        assert family_of(str(tmp_path / "flux.safetensors")) == "flux"
        assert family_of(str(tmp_path / "chroma.safetensors")) == "chroma"


def test_comfyui_names_cover_every_linear_the_blocks_and_top_hold(loaded):
    """Every Linear of the transformer has one BFL name (renamed, a member of a fused module, or top-level), as
    diffusers' convert_chroma_transformer_checkpoint_to_diffusers names them."""
    family, parts, _ = loaded
    names = family.comfyui_names
    covered = set()
    for name, module in parts.transformer.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        blocks, _, rest = name.partition(".")
        index, _, tail = rest.partition(".")
        if blocks in names.blocks and index.isdigit():
            members = [m for fused in names.fused[blocks].values() for m in fused]
            assert (tail in names.renamed[blocks]) + members.count(tail) == 1, name
        else:
            assert name in names.top, name
        covered.add(name)
    assert any(n.startswith("distilled_guidance_layer.layers.0.") for n in covered)


def test_presets_resolve_to_the_anchors_sets(loaded):
    from finetune.strategies.lora_presets import targets

    family, parts, _ = loaded
    onetrainer = targets(family, "attention_mlp", parts.transformer)
    assert "single_transformer_blocks.0.proj_mlp" in onetrainer and "transformer_blocks.0.ff.net.2" in onetrainer
    assert "transformer_blocks.0.attn.add_k_proj" in onetrainer
    assert not any("ff_context" in n or n == "proj_out" or "distilled" in n for n in onetrainer)
    every = targets(family, "all_linear", parts.transformer)
    assert set(onetrainer) < set(every) and "single_transformer_blocks.0.proj_out" in every


def test_an_int8_lora_loads_with_the_chroma_pipelines_own_loader(chroma_base, tmp_path):
    """model.quantize: int8 trains a LoRA on the quantised transformer; ChromaPipeline.load_lora_weights (Flux's
    loader) puts it on every default target of both block kinds."""
    from finetune.models.quantize import is_quantized
    from tests.helpers import train_keeping_parts

    recipe = recipe_dict(chroma_base, draw_concept(tmp_path / "images"), tmp_path / "out",
                         strategy={"kind": "lora", "rank": 4},
                         train={"max_steps": 4, "learning_rate": 5e-3, "batch_size": 2})
    recipe["model"]["quantize"] = "int8"
    artifact, parts = train_keeping_parts(parse_recipe(recipe))
    assert is_quantized(parts.transformer)
    pipe = saved_pipeline(chroma_base)
    pipe.load_lora_weights(str(artifact))
    loaded = {n.rsplit(".lora_A", 1)[0] for n, _ in pipe.transformer.named_modules() if n.endswith(".lora_A")}
    assert "single_transformer_blocks.0.attn.to_q" in loaded and "transformer_blocks.0.attn.to_out.0" in loaded
    assert len(loaded) == 4 + 3  # the double block's q/k/v/out, the single block's q/k/v
    assert np.isfinite(pipe(["a purple sks"], num_inference_steps=2, height=32, width=32,
                            generator=torch.Generator().manual_seed(0), output_type="np").images).all()


def test_the_chroma_recipe_validates_and_trains_with_a_sample_grid(chroma_base, tmp_path):
    from PIL import Image

    out = train_shipped_recipe("chroma_lora", chroma_base, tmp_path,
                               extra=("sample.every=2", "sample.steps=2"))
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert Image.open(out / "samples" / "step-000002.png").size == (32, 64)
