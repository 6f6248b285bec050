"""Z-Image through the shared loop on a tiny ZImagePipeline built from configs (finetune/models/tiny_transformers.py):
training feeds the transformer what the pipeline feeds it and regresses what the pipeline steps with; a LoRA loads
with the pipeline's own loader. What every family shares is in test_family_contract.py and
test_strategy_contract.py."""
from __future__ import annotations


import pytest
import torch
import yaml

from finetune.data.dataset import uncropped_conditions
from finetune.models import family_for
from finetune.models.tiny import save_tiny_pipeline
from finetune.recipe.load import parse_recipe
from tests.helpers import draw_concept, recipe_dict, train_keeping_parts, train_shipped_recipe

PROMPT = "a purple sks"


@pytest.fixture(scope="module")
def zimage_base(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-zimage", family="zimage")


def recording(transformer, calls):
    def record(module, args, kwargs):
        x, t, captions = args[:3]
        calls.append(([v.detach().clone() for v in x], t.detach().clone(), [c.detach().clone() for c in captions]))
    return transformer.register_forward_pre_hook(record, with_kwargs=True)


def test_training_feeds_the_transformer_what_the_pipeline_feeds_it(zimage_base):
    """For the same latents, prompt and sigma: the same list of [C, 1, h, w] latents, the same t (1 - sigma) and
    the same caption features (Qwen3's second-to-last states, the caption's own tokens) reach the transformer."""
    family = family_for("zimage")
    parts = family.load(str(zimage_base))
    pipe = family.pipeline(parts)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    pipeline_calls, loop_calls = [], []
    hook = recording(parts.transformer, pipeline_calls)
    pipe(PROMPT, sigmas=[0.6], num_inference_steps=1, guidance_scale=0.0, height=32, width=32,
         latents=latents.clone(), output_type="latent")
    hook.remove()
    sigma = pipe.scheduler.sigmas[:1]  # 0.6, shifted by the scheduler's 3.0
    assert 0.6 < float(sigma) < 1
    hook = recording(parts.transformer, loop_calls)
    with torch.no_grad():
        family.predict(parts, latents, sigma, family.encode_prompts(parts, [PROMPT]), uncropped_conditions(1, 32, 32))
    hook.remove()
    (x, t, captions), (x_loop, t_loop, captions_loop) = pipeline_calls[0], loop_calls[0]
    assert len(x_loop) == len(x) == 1 and x_loop[0].shape == x[0].shape == (4, 1, 8, 8)
    assert torch.equal(x_loop[0], x[0])
    torch.testing.assert_close(t_loop, t, rtol=0, atol=1e-6)
    torch.testing.assert_close(t_loop, 1 - sigma, rtol=0, atol=1e-6)
    reference, _ = pipe.encode_prompt([PROMPT], do_classifier_free_guidance=False)
    assert captions_loop[0].shape == captions[0].shape == reference[0].shape
    torch.testing.assert_close(captions_loop[0], captions[0], rtol=0, atol=1e-6)


def test_cached_captions_are_the_pipelines_whatever_their_batch(zimage_base):
    """encode_prompts pads each caption's tokens to the encoder's 512 with a mask, so rows encoded in different
    batches (the text cache's) stack, and predict gets back exactly the list encode_prompt returns."""
    family = family_for("zimage")
    parts = family.load(str(zimage_base))
    captions = ["a", "a much longer caption about a purple sks on a beach"]
    states, mask = family.encode_prompts(parts, captions)
    assert states.shape[:2] == mask.shape == (2, 512)
    reference, _ = family.pipeline(parts).encode_prompt(list(captions), do_classifier_free_guidance=False)
    for i, expected in enumerate(reference):
        torch.testing.assert_close(states[i][mask[i]], expected, rtol=0, atol=1e-6)
        alone, alone_mask = family.encode_prompts(parts, [captions[i]])
        assert torch.equal(alone_mask[0], mask[i])
        torch.testing.assert_close(alone[0], states[i], rtol=0, atol=1e-6)
        assert not states[i][~mask[i]].any()


def test_the_predicted_velocity_steps_as_the_pipeline_steps(zimage_base):
    """The pipeline negates the transformer's output before its Euler step (it predicts x0 - noise); predict does
    too, so x + (sigma_next - sigma) * predict(...) is the pipeline's own next latent: training regresses the
    velocity noise - x0 that sampling integrates."""
    family = family_for("zimage")
    parts = family.load(str(zimage_base))
    pipe = family.pipeline(parts)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    stepped = {}

    def after_first(pipeline, step, timestep, kwargs):
        stepped.setdefault(step, kwargs["latents"].clone())
        return kwargs

    pipe(PROMPT, sigmas=[0.9, 0.4], num_inference_steps=2, guidance_scale=0.0, height=32, width=32,
         latents=latents.clone(), output_type="latent", callback_on_step_end=after_first)
    sigmas = pipe.scheduler.sigmas
    with torch.no_grad():
        velocity = family.predict(parts, latents, sigmas[:1], family.encode_prompts(parts, [PROMPT]),
                                  uncropped_conditions(1, 32, 32))
    assert velocity.shape == latents.shape and velocity.abs().mean() > 1e-3
    torch.testing.assert_close(latents + (sigmas[1] - sigmas[0]) * velocity, stepped[0], rtol=0, atol=1e-5)
    assert not torch.allclose(latents - (sigmas[1] - sigmas[0]) * velocity, stepped[0], atol=1e-3)


def test_default_sigmas_are_uniform_and_shifted_as_the_bases_scheduler(zimage_base):
    """diffusers' Z-Image script: u uniform (--weighting_scheme none) indexing the scheduler's training sigmas,
    which its config (shift 3.0, static) shifts; no loss weighting."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from tests.helpers import default_objective

    family = family_for("zimage")
    parts = family.load(str(zimage_base))
    objective = default_objective(family, parts)
    assert (objective.sampling, objective.shift, objective.resolution_shift) == ("uniform", 3.0, None)
    assert objective.weights(torch.tensor([0.5])) is None
    training = FlowMatchEulerDiscreteScheduler.from_config(parts.extra["sampling_scheduler"].config)
    u = torch.rand(64, generator=torch.Generator().manual_seed(0))
    indexed = training.sigmas[(u * training.config.num_train_timesteps).long()]
    # the scheduler's sigmas run from 1 down, so index u * 1000 is 1 - u shifted (the same uniform law), to 1/1000
    torch.testing.assert_close(objective.shifted(1 - u, 8, 8), indexed, rtol=0, atol=2e-3)


def test_a_lora_file_keeps_peft_keys_for_every_attention_projection(zimage_base, tmp_path):
    """The file keeps peft's `transformer.` keys for every attention projection (refiners and main layers). That
    ZImagePipeline.load_lora_weights puts a LoRA on each of them and reproduces what was trained is the strategy
    contract's check on every family:
    tests/contracts/test_strategy_contract.py::test_the_pipelines_own_loader_puts_back_every_trained_lora_layer."""
    from safetensors import safe_open

    recipe = parse_recipe(recipe_dict(zimage_base, draw_concept(tmp_path / "images"), tmp_path / "out",
                                      strategy={"kind": "lora", "rank": 4},
                                      train={"max_steps": 6, "learning_rate": 5e-3, "batch_size": 2}))
    artifact, parts = train_keeping_parts(recipe)
    with safe_open(str(artifact), "pt") as handle:
        keys = list(handle.keys())
    projections = {name for name, _ in parts.transformer.named_modules()
                   if name.endswith(("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0"))}
    assert len(projections) == 4 * 3  # one noise refiner, one context refiner and one main layer
    assert {k.split(".lora_")[0] for k in keys} == {f"transformer.{name}" for name in projections}


def test_validate_accepts_the_flow_options_on_zimage(zimage_base, tmp_path):
    """DDPM's options (model.min_snr_gamma) are refused by name on every flow family:
    tests/contracts/test_family_contract.py::test_options_of_another_family_are_refused_by_name."""
    from finetune.cli import main

    recipe = recipe_dict(zimage_base, draw_concept(tmp_path / "images", count=1), tmp_path / "out")
    recipe["model"]["flow"] = {"sigma_sampling": "logit_normal", "shift": 6.0}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["validate", str(tmp_path / "r.yaml")]) == 0


def test_the_zimage_recipe_validates_and_trains_on_a_tiny_zimage(zimage_base, tmp_path):
    out = train_shipped_recipe("zimage_lora", zimage_base, tmp_path)
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_a_text_encoder_lora_warns_that_the_pipelines_own_loader_drops_it(zimage_base, caplog):
    """ZImagePipeline.load_lora_weights reads transformer layers only; the file's Qwen3 layers load with
    finetune.load_adapter, and the run says so before training."""
    from finetune.strategies.lora import Options, Strategy

    family = family_for("zimage")
    parts = family.load(str(zimage_base))
    with caplog.at_level("WARNING"):
        Strategy(Options(kind="lora", text_encoder=True)).check(family, parts)
        Strategy(Options(kind="lora")).check(family, parts)
    warnings = [r.getMessage() for r in caplog.records if "would drop" in r.getMessage()]
    assert warnings == ["strategy.text_encoder: zimage's own load_lora_weights reads only transformer, so it would "
                        "drop the text_encoder layers of this file (finetune.load_adapter reads them)"]
