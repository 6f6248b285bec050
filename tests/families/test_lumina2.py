"""Lumina 2 through the shared loop on a tiny Lumina2Pipeline (finetune/models/lumina2.py's build_tiny): training
feeds the NextDiT exactly what Lumina2Pipeline feeds it (the system-prompted Gemma states and mask, the reversed
time 1 - sigma), regresses the negation of its output (what the pipeline steps with), and keeps Flux's VAE
normalisation; what Lumina 2 refuses is refused by name before loading; the ComfyUI file has the original fused
names; the shipped recipe trains. What every family shares is in test_family_contract.py and
test_strategy_contract.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from finetune.data.dataset import uncropped_conditions
from finetune.models import family_for
from finetune.models.lumina2 import PROMPT_START, SYSTEM_PROMPT
from finetune.models.tiny import save_tiny_pipeline
from finetune.recipe.load import parse_recipe
from tests.helpers import draw_concept, loaded_family, recipe_dict, recording, saved_pipeline, train_shipped_recipe

PROMPTS = ["a purple sks", "a longer caption: a purple sks on a beach"]


@pytest.fixture(scope="module")
def lumina_base(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-lumina2", family="lumina2")


@pytest.fixture(scope="module")
def loaded(lumina_base):
    return loaded_family(lumina_base)




@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_feeds_the_transformer_what_the_pipeline_feeds_it(lumina_base, dtype):
    """For the same prompts, noisy latents and sigma, tensor for tensor and dtype for dtype (fp32 and bf16): the
    4-D latents, Gemma's states, the tokenizer's mask, and timestep = 1 - sigma (the pipeline's 1 - t / 1000)."""
    family = family_for("lumina2")
    parts = family.load(str(lumina_base), dtype=dtype)
    pipe = family.pipeline(parts)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    pipeline_calls, loop_calls = [], []
    hook = recording(parts.transformer, pipeline_calls)
    pipe(PROMPTS, sigmas=[0.7234], num_inference_steps=1, guidance_scale=1.0, height=64, width=64,  # one call
         latents=latents, output_type="latent")
    hook.remove()
    sigma = pipe.scheduler.sigmas[:1].expand(2)
    assert float(sigma[0]) == pytest.approx(6 * 0.7234 / (1 + 5 * 0.7234))  # the config's static shift of 6
    hook = recording(parts.transformer, loop_calls)
    with torch.no_grad():
        # each caption encoded alone, as a text cache may have encoded it: the rows are the batch's
        conditioning = tuple(torch.cat(pair) for pair in zip(*(family.encode_prompts(parts, [p]) for p in PROMPTS)))
        family.predict(parts, latents, sigma, conditioning, uncropped_conditions(2, 64, 64))
    hook.remove()
    (inference,), (training,) = pipeline_calls, loop_calls
    for name in ("hidden_states", "encoder_hidden_states", "encoder_attention_mask", "timestep"):
        assert training[name].dtype == inference[name].dtype, name
        assert torch.equal(training[name], inference[name]), name
    torch.testing.assert_close(training["timestep"], 1 - sigma, rtol=0, atol=1e-6)
    assert training["encoder_hidden_states"].shape[:2] == training["encoder_attention_mask"].shape == (2, 256)


def test_golden_timestep_and_sign(loaded):
    """Hand-computed: x0 = 2, noise = -1, sigma = 0.25 give noisy = 0.75 x 2 + 0.25 x -1 = 1.25 and the velocity
    target noise - x0 = -3. A transformer that answers exactly in Lumina's own convention (x0 - noise = +3,
    time 0 = noise) gets timestep 0.75 and predict returns -3: zero loss against the target."""
    from finetune.models.flow_matching import FlowMatchingObjective

    family, parts, _ = loaded
    x0, noise = torch.full((1, 4, 8, 8), 2.0), torch.full((1, 4, 8, 8), -1.0)
    noisy = 0.75 * x0 + 0.25 * noise
    assert torch.all(noisy == 1.25)
    seen = {}

    class Oracle(torch.nn.Module):
        dtype = torch.float32

        def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, return_dict):
            seen["timestep"] = timestep
            return (torch.full_like(hidden_states, 3.0),)  # x0 - noise, as Lumina's NextDiT predicts it

    conditioning = family.encode_prompts(parts, PROMPTS[:1])
    out = family.predict(parts.with_modules({"transformer": Oracle()}), noisy, torch.tensor([0.25]), conditioning,
                         uncropped_conditions(1, 64, 64))
    assert torch.equal(seen["timestep"], torch.tensor([0.75]))
    assert torch.all(out == -3.0)
    # the shared objective's target for the same draw is the velocity noise - x0 (its noise is drawn first)
    noised = FlowMatchingObjective(sampling="uniform").noise(x0, torch.Generator().manual_seed(0))
    drawn = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noised.target, drawn - x0)


def test_the_predicted_velocity_steps_as_the_pipeline_steps(loaded):
    """x + (sigma_next - sigma) x predict(...) is the pipeline's own next latent (CFG off): training regresses the
    negated transformer output the pipeline integrates."""
    family, parts, pipe = loaded
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    stepped = {}

    def after_first(pipeline, step, timestep, kwargs):
        stepped.setdefault(step, kwargs["latents"].clone())
        return kwargs

    pipe(PROMPTS[:1], sigmas=[0.9, 0.4], num_inference_steps=2, guidance_scale=1.0, height=64, width=64,
         latents=latents, output_type="latent", callback_on_step_end=after_first)
    sigmas = pipe.scheduler.sigmas
    with torch.no_grad():
        velocity = family.predict(parts, latents, sigmas[:1], family.encode_prompts(parts, PROMPTS[:1]),
                                  uncropped_conditions(1, 64, 64))
    assert velocity.shape == latents.shape and velocity.abs().mean() > 1e-3
    torch.testing.assert_close(latents + (sigmas[1] - sigmas[0]) * velocity, stepped[0], rtol=0, atol=1e-5)


def test_prompts_are_system_prompted_gemma_second_to_last_states(loaded):
    """encode_prompts = Gemma's hidden_states[-2] of system prompt + " <Prompt Start> " + caption, 256 tokens
    under the tokenizer's mask (the pipeline's own system prompt), and the caption window is what remains."""
    family, parts, pipe = loaded
    assert pipe.system_prompt == SYSTEM_PROMPT
    states, mask = family.encode_prompts(parts, PROMPTS)
    tokens = pipe.tokenizer([SYSTEM_PROMPT + PROMPT_START + p for p in PROMPTS], padding="max_length",
                            max_length=256, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = parts.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask,
                                    output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(states, hidden, rtol=0, atol=0)
    assert torch.equal(mask, tokens.attention_mask)
    window = family.caption_window(pipe.tokenizer, None)
    assert window == 256 - len(pipe.tokenizer(SYSTEM_PROMPT + PROMPT_START).input_ids) and window > 20


def test_latents_are_flux_vae_normalised_and_the_pipeline_decodes_them_back(loaded):
    family, parts, pipe = loaded
    assert (parts.vae.config.shift_factor, parts.vae.config.scaling_factor) == (0.1159, 0.3611)
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        latents = family.encode_images(parts, pixels, torch.Generator().manual_seed(0))
        z = parts.vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(0))
        expected_image = parts.vae.decode(z).sample
    torch.testing.assert_close(latents, (z - 0.1159) * 0.3611, rtol=0, atol=1e-6)
    image = pipe(PROMPTS[:1], num_inference_steps=1, guidance_scale=1.0, height=64, width=64, output_type="pt",
                 callback_on_step_end=lambda *_: {"latents": latents}).images
    torch.testing.assert_close(image, (expected_image / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-5)


def test_default_sigmas_are_sigmoid_with_the_configs_static_shift(loaded):
    from finetune.models.flow_matching import FlowOptions
    from tests.helpers import default_objective

    family, parts, _ = loaded
    objective = default_objective(family, parts)
    assert (objective.sampling, objective.shift, objective.resolution_shift, objective.weighting) == \
        ("sigmoid", 6.0, None, "none")
    assert family.objective(parts, family.options(flow=FlowOptions(shift=3.0))).shift == 3.0


def test_validate_refuses_another_familys_key_and_refused_strategies_by_name(lumina_base, tmp_path, capsys):
    from finetune.cli import main

    images = draw_concept(tmp_path / "images", count=1)
    recipe = recipe_dict(lumina_base, images, tmp_path / "out")
    recipe["model"].update(family="lumina2", guidance=3.5)  # Flux.1-dev's key
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["validate", str(tmp_path / "r.yaml")]) == 2
    assert "model.guidance" in capsys.readouterr().err
    for strategy, said in (({"kind": "textual_inversion", "placeholder_token": "<sks>", "initializer_token": "x"},
                            "textual inversion on lumina2 is not written yet"),
                           ({"kind": "lora", "text_encoder": True}, "strategy.text_encoder: lora on lumina2")):
        recipe = recipe_dict(lumina_base, images, tmp_path / "out", strategy=strategy)
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
        assert main(["validate", str(tmp_path / "r.yaml")]) == 2
        assert said in capsys.readouterr().err


def test_a_lumina2_single_file_is_told_from_a_zimage_one(tmp_path):
    from safetensors.torch import save_file

    from finetune.models.detect import family_of

    common = ("cap_embedder.1.weight", "context_refiner.0.attention.qkv.weight", "noise_refiner.0.attention.qkv.weight")
    for prefix in ("", "model.diffusion_model."):
        save_file({prefix + k: torch.zeros(1) for k in common + ("layers.0.adaLN_modulation.1.weight",)},
                  str(tmp_path / "lumina2.safetensors"))
        save_file({prefix + k: torch.zeros(1) for k in common + ("layers.0.adaLN_modulation.0.weight",)},
                  str(tmp_path / "zimage.safetensors"))
        assert family_of(str(tmp_path / "lumina2.safetensors")) == "lumina2"
        assert family_of(str(tmp_path / "zimage.safetensors")) != "lumina2"


def test_comfyui_names_cover_every_linear_as_diffusers_converter_names_them(loaded):
    """Every Linear of the transformer has one original name (renamed, a member of attention.qkv, or top-level),
    and the names are those diffusers' convert_lumina2_to_diffusers maps back to the diffusers ones."""
    from diffusers.loaders.single_file_utils import convert_lumina2_to_diffusers

    family, parts, _ = loaded
    names = family.comfyui_names
    originals = {}
    for name, module in parts.transformer.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        blocks, _, rest = name.partition(".")
        index, _, tail = rest.partition(".")
        if blocks in names.blocks and index.isdigit():
            fused = [f for f, members in names.fused[blocks].items() if tail in members]
            assert (tail in names.renamed[blocks]) + len(fused) == 1, name
            original = f"{blocks}.{index}.{names.renamed[blocks].get(tail) or fused[0]}"
        else:
            original = names.top[name]
        originals.setdefault(original + ".weight", []).append(name + ".weight")
    back = convert_lumina2_to_diffusers({k: torch.zeros(2304 + 768 + 768 if "qkv" in k else 1) for k in originals})
    assert set(back) == {n for ns in originals.values() for n in ns}


def test_the_comfyui_file_fuses_q_k_v_in_order(lumina_base, tmp_path):
    """strategy.formats: [diffusers, comfyui] writes diffusion_model.<block>.N.attention.qkv with lora_B rows q
    (24), k (8), v (8) of the diffusers file stacked, and attention.out for to_out.0."""
    from safetensors.torch import load_file

    from finetune.training import loop

    recipe = recipe_dict(lumina_base, draw_concept(tmp_path / "images"), tmp_path / "out",
                         strategy={"kind": "lora", "rank": 4, "formats": ["diffusers", "comfyui"]},
                         train={"max_steps": 2, "learning_rate": 5e-3})
    artifact = loop.train(parse_recipe(recipe))
    ours = load_file(str(artifact))
    comfy = load_file(str(next((tmp_path / "out" / "comfyui").glob("*.safetensors"))))
    for block in ("layers.0", "noise_refiner.0", "context_refiner.0"):
        up = comfy[f"diffusion_model.{block}.attention.qkv.lora_B.weight"]
        assert up.shape[0] == 24 + 8 + 8
        parts = [ours[f"transformer.{block}.attn.{m}.lora_B.weight"] for m in ("to_q", "to_k", "to_v")]
        assert torch.equal(up, torch.block_diag(*parts))
        assert f"diffusion_model.{block}.attention.out.lora_A.weight" in comfy


def test_an_int8_lora_loads_with_the_lumina2_pipelines_own_loader(lumina_base, tmp_path):
    from finetune.models.quantize import is_quantized
    from tests.helpers import train_keeping_parts

    recipe = recipe_dict(lumina_base, draw_concept(tmp_path / "images"), tmp_path / "out",
                         strategy={"kind": "lora", "rank": 4},
                         train={"max_steps": 4, "learning_rate": 5e-3, "batch_size": 2})
    recipe["model"]["quantize"] = "int8"
    artifact, parts = train_keeping_parts(parse_recipe(recipe))
    assert is_quantized(parts.transformer)
    pipe = saved_pipeline(lumina_base)
    pipe.load_lora_weights(str(artifact))
    loaded = {n.rsplit(".lora_A", 1)[0] for n, _ in pipe.transformer.named_modules() if n.endswith(".lora_A")}
    assert "context_refiner.0.attn.to_k" in loaded and "layers.0.attn.to_out.0" in loaded
    assert len(loaded) == 3 * 4  # q/k/v/out in the main layer and both refiners
    assert np.isfinite(pipe(["a purple sks"], num_inference_steps=2, height=32, width=32,
                            generator=torch.Generator().manual_seed(0), output_type="np").images).all()


def test_the_lumina2_recipe_validates_and_trains_with_a_sample_grid(lumina_base, tmp_path):
    from PIL import Image

    out = train_shipped_recipe("lumina2_lora", lumina_base, tmp_path, extra=("sample.every=2", "sample.steps=2"))
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "comfyui").is_dir()
    assert Image.open(out / "samples" / "step-000002.png").size == (32, 64)
