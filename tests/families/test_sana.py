"""Sana through the shared loop on a tiny SanaPipeline (finetune/models/sana.py's build_tiny): training feeds the
transformer exactly what SanaPipeline feeds it (Gemma states after the complex human instruction, their mask,
timestep = sigma x 1000), regresses the velocity the pipeline steps with, and keeps the DC-AE's `latent x
scaling_factor`; what Sana refuses is refused by name before loading; the shipped recipe trains. What every family
shares is in test_family_contract.py and test_strategy_contract.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from finetune.data.dataset import uncropped_conditions
from finetune.models import family_for
from finetune.models.sana import MAX_SEQUENCE_LENGTH, instruction
from finetune.models.tiny import save_tiny_pipeline
from tests.helpers import draw_concept, loaded_family, recipe_dict, recording, saved_pipeline, train_shipped_recipe

PROMPTS = ["a purple sks", "A much longer caption about a purple sks on a beach"]


@pytest.fixture(scope="module")
def sana_base(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sana", family="sana")


@pytest.fixture(scope="module")
def loaded(sana_base):
    return loaded_family(sana_base)




def euler(pipe):
    """The pipeline on a flow-matching Euler scheduler with Sana's shift: float timesteps, sigmas= accepted."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return pipe


def feeds(family, parts, pipe, latents, prompts, sigma=None, **call):
    """(what __call__ gave the transformer, what training gives it) for the same latents and sigma."""
    pipeline_calls, loop_calls = [], []
    hook = recording(parts.transformer, pipeline_calls)
    pipe(prompts, num_inference_steps=1, guidance_scale=1.0, height=32, width=32, latents=latents,
         use_resolution_binning=False, output_type="latent", **call)  # no CFG: one call
    hook.remove()
    sigma = pipe.scheduler.sigmas[:1].expand(len(prompts)) if sigma is None else sigma
    hook = recording(parts.transformer, loop_calls)
    with torch.no_grad():
        # each caption encoded alone, as a text cache may have encoded it: the rows are the batch's
        conditioning = tuple(torch.cat(pair) for pair in zip(*(family.encode_prompts(parts, [p]) for p in prompts)))
        family.predict(parts, latents, sigma, conditioning, uncropped_conditions(len(prompts), 32, 32))
    hook.remove()
    return pipeline_calls[0], loop_calls[0]


def test_training_feeds_the_transformer_what_the_pipeline_feeds_it(sana_base):
    """Tensor for tensor, dtype included: latents as they are, the CHI-prefixed Gemma states and their mask,
    timestep = sigma x 1000 (sigmas=[0.6] shifted by 3)."""
    family = family_for("sana")
    parts = family.load(str(sana_base))
    pipe = euler(family.pipeline(parts))
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    inference, training = feeds(family, parts, pipe, latents, PROMPTS, sigmas=[0.6])
    assert set(inference) - {"attention_kwargs"} == set(training) and inference["attention_kwargs"] is None
    for name in ("hidden_states", "encoder_hidden_states", "encoder_attention_mask", "timestep"):
        assert training[name].dtype == inference[name].dtype, name
        torch.testing.assert_close(training[name], inference[name], rtol=0, atol=0, msg=name)
    sigma = 3 * 0.6 / (1 + 2 * 0.6)
    torch.testing.assert_close(training["timestep"], torch.full((2,), sigma * 1000), rtol=0, atol=1e-3)
    assert training.get("guidance") is None and training["encoder_hidden_states"].shape == (2, MAX_SEQUENCE_LENGTH, 16)


def test_with_the_released_dpm_solver_only_its_integer_timestep_differs(loaded):
    """The released scheduler (DPM-Solver++ on flow sigmas) truncates t = sigma x 1000 to an integer; given that
    sigma (t / 1000), training feeds the same timestep, and everything else is identical."""
    family, parts, pipe = loaded
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    pipe.scheduler.set_timesteps(1)
    t = pipe.scheduler.timesteps[:1]
    assert t.dtype == torch.int64 and int(t) == 999  # flow_shift 3.0 of 0.999
    inference, training = feeds(family, parts, pipe, latents, PROMPTS[:1], sigma=t.float() / 1000)
    for name in ("hidden_states", "encoder_hidden_states", "encoder_attention_mask"):
        assert torch.equal(training[name], inference[name]), name
    torch.testing.assert_close(training["timestep"], inference["timestep"], rtol=0, atol=1e-4)


def test_golden_objective_convention(loaded):
    """By hand: x0 = 2, noise = -1, sigma = 0.25 gives noisy = 0.75 x 2 + 0.25 x -1 = 1.25 and target noise - x0
    = -3; the transformer gets timestep 250.0; predict returns the transformer's output with its sign as is, and an
    Euler step with that velocity from 1.25 at sigma 0.25 to sigma 0 lands on x0 = 2 (the pipeline's direction)."""
    from finetune.models.flow_matching import FlowMatchingObjective

    family, parts, _ = loaded
    x0 = torch.full((1, 4, 8, 8), 2.0)

    objective = FlowMatchingObjective(sampling="uniform")
    noised = objective.noise(x0, torch.Generator().manual_seed(0))
    s = noised.timesteps.view(-1, 1, 1, 1)
    noise = (noised.noisy - (1 - s) * x0) / s
    torch.testing.assert_close(noised.target, noise - x0, rtol=0, atol=1e-4)  # the loop's target: velocity noise - x0
    noisy = 0.75 * x0 + 0.25 * torch.full_like(x0, -1.0)
    assert float(noisy[0, 0, 0, 0]) == 1.25
    calls = []
    hook = recording(parts.transformer, calls)
    swap = parts.transformer.register_forward_hook(lambda module, args, output: (torch.full_like(x0, -3.0),))
    try:
        with torch.no_grad():
            velocity = family.predict(parts, noisy, torch.tensor([0.25]), family.encode_prompts(parts, PROMPTS[:1]),
                                      uncropped_conditions(1, 32, 32))
    finally:
        hook.remove()
        swap.remove()
    assert calls[0]["timestep"].tolist() == [250.0]
    assert torch.equal(velocity, torch.full_like(x0, -3.0))  # not negated: it is the velocity noise - x0
    assert torch.equal(noisy + (0.0 - 0.25) * velocity, x0)


def test_prompts_carry_the_pipelines_complex_human_instruction(loaded):
    """encode_prompts = encode_prompt with the CHI SanaPipeline.__call__ prepends by default: 300 states, the mask
    keeping the first token, CHI's last and the caption (lowercased); a caption of 298 tokens is kept whole."""
    family, parts, pipe = loaded
    chi = instruction(type(pipe))
    assert chi and chi[0].startswith("Given a user prompt")
    states, mask = family.encode_prompts(parts, PROMPTS)
    expected, expected_mask, *_ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False,
                                                     complex_human_instruction=chi)
    plain, _, *_ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    assert torch.equal(states, expected) and torch.equal(mask, expected_mask)
    assert not torch.allclose(states, plain, atol=1e-4)
    assert mask.sum(1).tolist() == [len(p) + 2 for p in PROMPTS]
    window = family.caption_window(pipe.tokenizer, None)
    assert window == 298
    whole, cut = family.encode_prompts(parts, ["x" * window])[1], family.encode_prompts(parts, ["x" * (window + 1)])
    assert int(whole.sum()) == MAX_SEQUENCE_LENGTH
    assert torch.equal(cut[0], family.encode_prompts(parts, ["x" * window])[0])  # the extra token is cut


def test_latents_are_dc_ae_scaled_and_the_pipeline_decodes_them_back(loaded):
    """encode_images = vae.encode(x).latent x scaling_factor (the diffusers script's; no shift, no draw), and the
    pipeline's own decode path turns them into what the VAE decodes from the latent."""
    family, parts, pipe = loaded
    scale = parts.vae.config.scaling_factor
    assert scale == 0.41407 and pipe.vae_scale_factor == 4
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        latents = family.encode_images(parts, pixels, torch.Generator().manual_seed(0))
        z = parts.vae.encode(pixels).latent
        expected_image = parts.vae.decode(z).sample
    assert latents.shape == (1, 4, 8, 8)
    torch.testing.assert_close(latents, z * scale, rtol=0, atol=0)

    def hand_back(pipeline, step, timestep, kwargs):
        return {"latents": latents}

    image = pipe(PROMPTS[:1], num_inference_steps=1, guidance_scale=1.0, height=32, width=32, output_type="pt",
                 use_resolution_binning=False, callback_on_step_end=hand_back).images
    torch.testing.assert_close(image, (expected_image / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-5)


def test_default_sigmas_are_sigmoid_shifted_by_the_schedulers_flow_shift(loaded):
    from finetune.models.flow_matching import FlowOptions
    from tests.helpers import default_objective

    family, parts, _ = loaded
    objective = default_objective(family, parts)
    assert (objective.sampling, objective.shift, objective.resolution_shift, objective.weighting) == (
        "sigmoid", 3.0, None, "none")
    assert family.objective(parts, family.options(flow=FlowOptions(shift=2.0))).shift == 2.0


def test_the_hypernetwork_acts_on_the_cross_attention_only(loaded):
    """Sana's attn2 reads the caption alone: the network rewrites its to_k / to_v; attn1 (image tokens) is left."""
    from finetune.networks.hypernetwork_points import points

    family, parts, _ = loaded
    assert family.hypernetwork_text_stream is None
    found = points(parts.transformer, None)
    assert [p.name for p in found] == ["transformer_blocks.0.attn2"] and found[0].width == 8


@pytest.mark.parametrize("strategy, words", [
    ({"kind": "textual_inversion", "placeholder_token": "<sks>", "initializer_token": "x"},
     ("textual inversion on sana is not written yet", "Gemma-2")),
    ({"kind": "lora", "text_encoder": True}, ("strategy.text_encoder", "transformer's LoRA only")),
    ({"kind": "hypernetwork", "a1111_pt": True}, ("strategy.a1111_pt", "AUTOMATIC1111 has no Sana")),
])
def test_validate_refuses_what_sana_does_not_train_by_name(sana_base, tmp_path, capsys, strategy, words):
    from finetune.cli import main

    recipe = recipe_dict(sana_base, draw_concept(tmp_path / "images", count=1), tmp_path / "out", strategy=strategy)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["validate", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err


def test_validate_refuses_another_familys_key(sana_base, tmp_path, capsys):
    from finetune.cli import main

    recipe = recipe_dict(sana_base, draw_concept(tmp_path / "images", count=1), tmp_path / "out")
    recipe["model"].update(family="sana", guidance=3.5)  # Flux.1-dev's key: Sana has no guidance input
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["validate", str(tmp_path / "r.yaml")]) == 2
    assert "model.guidance" in capsys.readouterr().err


def test_a_sana_single_file_is_told_from_a_pixart_one(tmp_path):
    from safetensors.torch import save_file

    from finetune.models.detect import UnsupportedFamily, family_of

    save_file({"blocks.0.cross_attn.q_linear.weight": torch.zeros(1), "attention_y_norm.weight": torch.zeros(1)},
              str(tmp_path / "sana.safetensors"))
    save_file({"blocks.0.cross_attn.q_linear.weight": torch.zeros(1)}, str(tmp_path / "pixart.safetensors"))
    assert family_of(str(tmp_path / "sana.safetensors")) == "sana"
    with pytest.raises(UnsupportedFamily, match="Sana or PixArt"):
        family_of(str(tmp_path / "pixart.safetensors"))


def test_an_int8_lora_loads_with_the_sana_pipelines_own_loader(sana_base, tmp_path):
    """model.quantize: int8 trains a LoRA on the quantised transformer; SanaPipeline.load_lora_weights puts it on
    the default targets, to_k / to_q / to_v of both attentions."""
    from finetune.models.quantize import is_quantized
    from finetune.recipe.load import parse_recipe
    from tests.helpers import train_keeping_parts

    recipe = recipe_dict(sana_base, draw_concept(tmp_path / "images"), tmp_path / "out",
                         strategy={"kind": "lora", "rank": 4}, train={"max_steps": 2, "learning_rate": 5e-3})
    recipe["model"]["quantize"] = "int8"
    artifact, parts = train_keeping_parts(parse_recipe(recipe))
    assert is_quantized(parts.transformer)
    pipe = saved_pipeline(sana_base)
    pipe.load_lora_weights(str(artifact))
    loaded = {n.rsplit(".lora_A", 1)[0] for n, _ in pipe.transformer.named_modules() if n.endswith(".lora_A")}
    assert loaded == {f"transformer_blocks.0.attn{i}.to_{p}" for i in (1, 2) for p in "qkv"}
    assert np.isfinite(pipe(["a purple sks"], num_inference_steps=2, height=32, width=32, use_resolution_binning=False,
                            generator=torch.Generator().manual_seed(0), output_type="np").images).all()


def test_the_sana_recipe_validates_and_trains_with_a_sample_grid(sana_base, tmp_path):
    from PIL import Image

    out = train_shipped_recipe("sana_lora", sana_base, tmp_path, extra=("sample.every=2", "sample.steps=2"))
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert Image.open(out / "samples" / "step-000002.png").size == (32, 64)
