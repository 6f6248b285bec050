"""Flux.1 through the shared loop, on a tiny Flux built from configs (finetune/models/tiny_transformers.py): packing,
what the loop feeds the transformer against what FluxPipeline feeds it, a LoRA file diffusers' own loader reads
back, the guidance embedding, detection, validate, sampling and the shipped recipe. What every family shares is in
test_family_contract.py and test_strategy_contract.py."""
from __future__ import annotations


import pytest
import torch
import yaml

from finetune.export.single_file_writers import write_single_file
from finetune.models import family_for
from finetune.models.flux import pack, unpack
from finetune.models.tiny import save_tiny_pipeline
from finetune.recipe.load import parse_recipe
from tests.helpers import (draw_concept, recipe_dict, saved_pipeline, train_keeping_parts,
                            train_shipped_recipe)


@pytest.fixture(scope="module")
def flux_base(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-flux", family="flux")


@pytest.fixture(scope="module")
def schnell_base(tmp_path_factory):
    """The tiny Flux without a guidance input, as Flux.1-schnell is built."""
    from finetune.models.tiny_transformers import build_tiny_flux_pipeline

    folder = tmp_path_factory.mktemp("models") / "tiny-flux-schnell"
    build_tiny_flux_pipeline(guidance_embeds=False).save_pretrained(folder)
    return folder


def recording(calls):
    """before_steps for train_keeping_parts: keeps the keyword arguments of each transformer call."""
    def hook(parts):
        parts.transformer.register_forward_pre_hook(
            lambda module, args, kwargs: calls.append({k: v.detach().clone() if torch.is_tensor(v) else v
                                                       for k, v in kwargs.items()}), with_kwargs=True)
    return hook


def test_latents_pack_into_2x2_tokens_in_the_order_of_their_position_ids():
    """pack/unpack are inverse; token i holds the 2x2 patch whose (row, col) is img_ids[i] (the pipeline's ids),
    its 4C features channel-major as FluxPipeline._pack_latents lays them."""
    from diffusers import FluxPipeline

    latents = torch.randn(2, 4, 6, 10, generator=torch.Generator().manual_seed(0))
    tokens = pack(latents)
    assert tokens.shape == (2, 3 * 5, 16)
    assert torch.equal(unpack(tokens, 6, 10), latents)
    ids = FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32)
    for i, (_, row, col) in enumerate(ids.long().tolist()):
        patch = latents[:, :, 2 * row:2 * row + 2, 2 * col:2 * col + 2]
        assert torch.equal(tokens[:, i], patch.reshape(2, 16))


@pytest.mark.parametrize("guidance", [None, 2.5])
def test_the_loop_feeds_the_transformer_what_flux_pipeline_feeds_it(flux_base, tmp_path, guidance):
    """Training sees what inference sees: for one 32 px image and its caption, the transformer's first training
    call gets the packed latents with the pipeline's img_ids, encode_prompt's T5 states, CLIP-L pooled output and
    txt_ids, the sigma itself as timestep (not x 1000), and the guidance value (model.guidance, default 1.0) that
    FluxPipeline.__call__ gives for the same latents, prompt, sigma and guidance_scale."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    ours = []
    recipe = recipe_dict(flux_base, draw_concept(tmp_path / "images", count=1), tmp_path / "out",
                         train={"max_steps": 1, "batch_size": 1})
    recipe["model"]["guidance"] = guidance
    train_keeping_parts(parse_recipe(recipe), before_steps=recording(ours))
    ours = ours[0]
    sigma = float(ours["timestep"][0])
    assert 0 < sigma < 1 and ours["hidden_states"].shape == (1, 4 * 4, 16)  # 8x8 latents: 16 tokens of 2x2x4

    pipe = saved_pipeline(flux_base)
    # a scheduler that leaves sigmas as given, so the pipeline's one step is at the loop's sigma
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, use_dynamic_shifting=False,
                                                                 shift=1.0)
    theirs = []
    pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: theirs.append({k: v for k, v in kwargs.items() if torch.is_tensor(v)}),
        with_kwargs=True)
    pipe("a purple sks", latents=ours["hidden_states"], sigmas=[sigma], num_inference_steps=1, height=32, width=32,
         guidance_scale=1.0 if guidance is None else guidance, output_type="latent")
    theirs = theirs[0]
    assert set(theirs) == {"hidden_states", "timestep", "guidance", "pooled_projections", "encoder_hidden_states",
                           "txt_ids", "img_ids"}
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key].float(), value.float(), rtol=0, atol=1e-6, msg=key)
    assert ours["encoder_hidden_states"].shape[1] == 512  # the pipeline's default T5 length


def test_a_schnell_build_gets_no_guidance_and_refuses_one(schnell_base, tmp_path, capsys):
    from finetune.cli import main
    from finetune.data.dataset import uncropped_conditions

    family = family_for("flux")
    parts = family.load(str(schnell_base))
    calls = []
    recording(calls)(parts)
    with torch.no_grad():
        family.predict(parts, torch.randn(1, 4, 8, 8), torch.tensor([0.5]), family.encode_prompts(parts, ["x"]),
                       uncropped_conditions(1, 32, 32))
        assert calls[0]["guidance"] is None
        parts.options.guidance = 2.0
        with pytest.raises(ValueError, match="model.guidance: .* has no guidance embedding"):
            family.predict(parts, torch.randn(1, 4, 8, 8), torch.tensor([0.5]),
                           family.encode_prompts(parts, ["x"]), uncropped_conditions(1, 32, 32))
    recipe = recipe_dict(schnell_base, draw_concept(tmp_path / "images", count=1), tmp_path / "out")
    recipe["model"]["guidance"] = 2.0
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["validate", str(tmp_path / "r.yaml")]) == 2
    assert "model.guidance:" in capsys.readouterr().err


@pytest.fixture(scope="module")
def lora_run(flux_base, tmp_path_factory):
    """LoRA on the transformer and CLIP-L, with a sample grid."""
    tmp = tmp_path_factory.mktemp("flux-lora")
    recipe = parse_recipe(recipe_dict(
        flux_base, draw_concept(tmp / "images"), tmp / "out",
        strategy={"kind": "lora", "rank": 4, "text_encoder": True},
        train={"max_steps": 6, "learning_rate": 5e-3, "batch_size": 2},
        sample={"every": 6, "prompts": ["a purple sks"], "steps": 2, "guidance_scale": 3.5}))
    artifact, parts = train_keeping_parts(recipe)
    return artifact, parts, tmp / "out"


def test_a_lora_file_keeps_peft_keys_for_the_flux_scripts_targets(lora_run):
    """`transformer.` keys as peft names them (the diffusers Flux script's targets, MLPs included) and CLIP-L's
    `text_encoder.text_model.`. That FluxPipeline.load_lora_weights reproduces what was trained is the strategy
    contract's check on every family:
    tests/contracts/test_strategy_contract.py::test_the_pipelines_own_loader_puts_back_every_trained_lora_layer."""
    from safetensors import safe_open

    artifact, _, out = lora_run
    with safe_open(str(artifact), "pt") as handle:
        keys = list(handle.keys())
    assert {k.split(".")[0] for k in keys} == {"transformer", "text_encoder"}
    assert all(".lora_A." in k or ".lora_B." in k for k in keys)
    for part in ("attn.to_q", "attn.add_k_proj", "attn.to_add_out", "ff.net.2", "ff_context.net.0.proj"):
        assert any(f"transformer.transformer_blocks.0.{part}.lora_A." in k for k in keys), part
    assert any(k.startswith("transformer.single_transformer_blocks.0.attn.to_q.") for k in keys)
    assert all(k.startswith("text_encoder.text_model.") for k in keys if k.startswith("text_encoder"))
    assert (out / "samples" / "step-000006.png").is_file()


def test_finetune_sample_draws_with_a_flux_base_and_its_lora(lora_run, flux_base, tmp_path):
    from PIL import Image

    from finetune.cli import main

    artifact, _, _ = lora_run
    grid = tmp_path / "grid.png"
    # --resolution: the CLI's default reads the denoiser's config.sample_size, which Flux's transformer lacks
    assert main(["sample", "--base", str(flux_base), "--adapter", str(artifact), "--prompt", "a purple sks",
                 "--steps", "2", "--guidance", "3.5", "--resolution", "32", "--num", "1", "--out", str(grid)]) == 0
    assert Image.open(grid).size == (32, 32)


def test_validate_refuses_ddpm_options_and_guidance_where_there_is_none(flux_base, tiny_base, tmp_path, capsys):
    from finetune.cli import main

    images = draw_concept(tmp_path / "images", count=1)
    path = tmp_path / "r.yaml"

    def validate(base, **sections):
        recipe = recipe_dict(base, images, tmp_path / "out", **sections)
        path.write_text(yaml.safe_dump(recipe))
        return main(["validate", str(path)]), capsys.readouterr().err

    code, err = validate(flux_base, model={"min_snr_gamma": 5.0})
    assert code == 2 and "model.min_snr_gamma: an option of model.family sd / sdxl, and this model is flux" in err
    code, err = validate(tiny_base, model={"guidance": 1.0})  # an SD 1.x base
    assert code == 2 and "model.guidance: an option of model.family flux / flux_kontext / flux2, and this model is sd" in err
    assert validate(flux_base, model={"guidance": 3.5, "flow": {"sigma_sampling": "logit_normal", "shift": 3.0}})[0] == 0


def test_the_default_sigmas_follow_the_resolution_and_a_static_shift_replaces_it(flux_base):
    """sigmoid draws shifted by the token count (at 1024 px, 4096 tokens: e^1.15, kohya's recommended 3.1582);
    model.flow.shift alone is a static shift instead."""
    import math

    from tests.helpers import default_objective

    family = family_for("flux")
    parts = family.load(str(flux_base))
    objective = default_objective(family, parts)
    assert objective.sampling == "sigmoid" and objective.resolution_shift is not None
    assert math.isclose(math.exp(objective.resolution_shift.mu(128, 128)), 3.1582, abs_tol=1e-3)
    options = family.spec.options()
    options.flow.shift = 3.0
    static = family.objective(parts, options)
    assert static.resolution_shift is None and static.shift == 3.0


def test_a_flux_base_is_told_from_its_folder_or_its_single_file(flux_base, tmp_path):
    from safetensors.torch import save_file

    from finetune.models.detect import family_of

    assert family_of(str(flux_base)) == "flux"
    for prefix in ("", "model.diffusion_model."):  # BFL's file, and ComfyUI's full checkpoint
        single = tmp_path / f"flux{len(prefix)}.safetensors"
        save_file({f"{prefix}double_blocks.0.img_attn.qkv.weight": torch.zeros(1)}, str(single))
        assert family_of(str(single)) == "flux"
    flux2 = tmp_path / "flux2.safetensors"  # Flux.2 has double_blocks too: its own family (models/flux2.py)
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(1),
               "single_stream_modulation.lin.weight": torch.zeros(1)}, str(flux2))
    assert family_of(str(flux2)) == "flux2"



def test_a_single_file_checkpoint_is_refused_clearly(lora_run, tmp_path):
    _, parts, _ = lora_run
    with pytest.raises(ValueError, match="no single-file Flux.1 .*checkpoint"):
        write_single_file(family_for("flux"), parts, str(tmp_path / "x.safetensors"))


def test_the_flux_recipe_validates_and_trains_on_a_tiny_flux(flux_base, tmp_path):
    out = train_shipped_recipe("flux_lora", flux_base, tmp_path)
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_the_16gb_flux_recipe_validates_and_trains_on_a_tiny_flux(flux_base, tmp_path):
    # its int8 base, caches and offloading as shipped (benchmarks/memory.py estimates its peak)
    out = train_shipped_recipe("flux_lora_16gb", flux_base, tmp_path)
    assert (out / "pytorch_lora_weights.safetensors").is_file()
