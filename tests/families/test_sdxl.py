"""Stable Diffusion XL through the shared loop, on a tiny SDXL built from configs (finetune/models/tiny.py): what the
loop conditions the U-Net with equals what the SDXL pipeline builds at inference, each strategy's SDXL files, the
fp32 VAE, detection, recipes and sampling. What every family shares is in test_family_contract.py and
test_strategy_contract.py."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from finetune.models import family_for
from finetune.models.tiny import save_tiny_pipeline
from finetune.recipe.load import parse_recipe
from tests.helpers import (draw_concept, images_of, recipe_dict, saved_pipeline, train_keeping_parts,
                            train_shipped_recipe)


@pytest.fixture(scope="module")
def sdxl_base(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sdxl", family="sdxl")


def test_the_loop_conditions_the_unet_as_the_sdxl_pipeline_does(sdxl_base, tmp_path):
    """Training sees what inference sees: for a 48x32 image (centre-cropped to 32x32, so its corner is (0, 8)) and
    its caption, the U-Net's first call gets the pipeline's encode_prompt hidden states and pooled embedding, and
    its time-id helper's (original size, crop corner, target size)."""
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (48, 32), "purple").save(folder / "wide.png")
    (folder / "wide.txt").write_text("a purple sks")
    calls = []

    def record(parts):
        parts.unet.register_forward_pre_hook(
            lambda module, args, kwargs: calls.append((args[2].detach().clone(), {
                k: v.detach().clone() for k, v in kwargs["added_cond_kwargs"].items()})), with_kwargs=True)

    recipe = parse_recipe(recipe_dict(sdxl_base, folder, tmp_path / "out", train={"max_steps": 1, "batch_size": 1}))
    train_keeping_parts(recipe, before_steps=record)
    hidden, added = calls[0]
    pipe = saved_pipeline(sdxl_base)
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(["a purple sks"], do_classifier_free_guidance=False)
    time_ids = pipe._get_add_time_ids((32, 48), (0, 8), (32, 32), dtype=torch.float32,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    assert hidden.shape[-1] == 16 + 32  # CLIP-L and CLIP-G side by side
    torch.testing.assert_close(hidden, prompt_embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(added["text_embeds"], pooled, rtol=0, atol=1e-6)
    assert torch.equal(added["time_ids"], time_ids)


@pytest.fixture(scope="module")
def lora_run(sdxl_base, tmp_path_factory):
    """LoRA on the U-Net and both text encoders, CLIP-G with its own rank and learning rate; a sample grid."""
    tmp = tmp_path_factory.mktemp("sdxl-lora")
    recipe = parse_recipe(recipe_dict(
        sdxl_base, draw_concept(tmp / "images"), tmp / "out",
        strategy={"kind": "lora", "rank": 4, "text_encoder": True, "text_encoder_2_rank": 2,
                  "text_encoder_2_learning_rate": 3e-4, "formats": ["diffusers", "kohya"]},
        train={"max_steps": 6, "learning_rate": 5e-3, "batch_size": 2},
        sample={"every": 6, "prompts": ["a purple sks"], "steps": 2}))
    artifact, parts = train_keeping_parts(recipe)
    return artifact, parts, tmp / "out"


def test_lora_files_use_the_sdxl_prefixes_and_load_in_diffusers(lora_run, sdxl_base):
    from safetensors import safe_open

    artifact, parts, _ = lora_run
    with safe_open(str(artifact), "pt") as handle:
        keys = list(handle.keys())
        config = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
    # the text_model. level the files ComfyUI and kohya read have, for both CLIPs
    assert all(k.startswith(("text_encoder.text_model.", "text_encoder_2.text_model."))
               for k in keys if k.startswith("text_encoder"))
    assert config["text_encoder.r"] == 4 and config["text_encoder_2.r"] == 2
    trained = family_for("sdxl").pipeline(parts)
    loaded = saved_pipeline(sdxl_base)
    loaded.load_lora_weights(str(artifact))  # diffusers' own loader
    base = images_of(saved_pipeline(sdxl_base))
    assert np.abs(images_of(trained) - base).max() > 1e-3  # the LoRA does something
    np.testing.assert_allclose(images_of(loaded), images_of(trained), atol=1e-5)


def test_the_kohya_file_uses_kohyas_sdxl_names_and_reads_back(lora_run, sdxl_base, tmp_path):
    """lora_unet_ + the original (SGM) module names kohya's SDXL U-Net has, lora_te1_ / lora_te2_ for CLIP-L and
    CLIP-G, kohya's SDXL version tag; read back by load_adapter, convert and resize to what was trained."""
    from safetensors import safe_open

    from finetune import load_adapter
    from finetune.tools.convert import convert
    from finetune.tools.resize import resize_file

    artifact, parts, out = lora_run
    kohya_file = out / "kohya" / "out.safetensors"
    with safe_open(str(kohya_file), "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    stems = {k.split(".")[0] for k in keys}
    assert {s.split("_")[1] for s in stems} == {"unet", "te1", "te2"}
    # the tiny U-Net has one layer per block: its attention block is input_blocks.3 (conv_in, resnet, downsampler)
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q" in stems
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k" in stems
    assert not any(s.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_unet_mid_block")) for s in stems)
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in stems
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    trained = images_of(family_for("sdxl").pipeline(parts))
    for load in (lambda pipe: load_adapter(pipe, kohya_file),
                 lambda pipe: pipe.load_lora_weights(str(kohya_file))):  # diffusers' own SGM-name mapping agrees
        pipe = saved_pipeline(sdxl_base)
        load(pipe)
        np.testing.assert_allclose(images_of(pipe), trained, atol=1e-5)
    back = tmp_path / "back.safetensors"
    convert(kohya_file, back, "diffusers", base=str(sdxl_base))
    pipe = saved_pipeline(sdxl_base)
    pipe.load_lora_weights(str(back))
    np.testing.assert_allclose(images_of(pipe), trained, atol=1e-5)
    resize_file(kohya_file, tmp_path / "small.safetensors", rank=2, energy=None, base=str(sdxl_base))
    with safe_open(str(tmp_path / "small.safetensors"), "pt") as handle:
        assert set(handle.keys()) == set(keys)  # same names, lower rank


def test_each_text_encoder_trains_at_its_own_learning_rate(sdxl_base, tmp_path):
    from finetune.strategies.lora import Options, Strategy

    parts = family_for("sdxl").load(str(sdxl_base))
    strategy = Strategy(Options(kind="lora", rank=4, text_encoder=True, text_encoder_learning_rate=2e-4,
                                text_encoder_2_learning_rate=3e-4))
    strategy.prepare(family_for("sdxl"), parts)
    rates = [group["lr"] for group in strategy.parameter_groups(1e-3)]
    assert rates == [1e-3, 2e-4, 3e-4]  # U-Net, CLIP-L, CLIP-G
    only_g = Strategy(Options(kind="lora", rank=4, text_encoder_2=True))
    only_g.prepare(family_for("sdxl"), family_for("sdxl").load(str(sdxl_base)))
    assert list(only_g.modules) == ["unet", "text_encoder_2"]


def test_a_sample_grid_is_drawn_while_training_and_by_finetune_sample(lora_run, sdxl_base, tmp_path):
    from finetune.cli import main

    _, _, out = lora_run
    assert (out / "samples" / "step-000006.png").is_file()
    grid = tmp_path / "grid.png"
    assert main(["sample", "--base", str(sdxl_base), "--prompt", "a purple sks", "--steps", "2",
                 "--out", str(grid)]) == 0
    assert Image.open(grid).size[0] >= 32


def test_the_vae_stays_fp32_unless_it_says_half_precision_is_safe(sdxl_base, tmp_path):
    """The released SDXL VAE makes NaNs in fp16 (force_upcast in its config); an fp16-safe one (the fp16-fix VAE,
    given as model.vae) follows the base's dtype."""
    from finetune.models.tiny import build_tiny_sdxl_pipeline

    family = family_for("sdxl")
    parts = family.load(str(sdxl_base), dtype=torch.bfloat16)
    assert parts.vae.dtype == torch.float32 and parts.unet.dtype == torch.bfloat16
    safe_vae = tmp_path / "safe-vae"
    build_tiny_sdxl_pipeline(force_upcast=False).vae.save_pretrained(safe_vae)
    parts = family.load(str(sdxl_base), dtype=torch.bfloat16, vae=str(safe_vae))
    assert parts.vae.dtype == torch.bfloat16
    with torch.no_grad():  # fp32 latents from an fp32 VAE under a bf16 run
        mean, _ = family.encode_image_moments(family.load(str(sdxl_base), dtype=torch.bfloat16),
                                              torch.zeros(1, 3, 32, 32))
    assert mean.dtype == torch.float32


def test_a_bf16_sdxl_run_reads_the_vae_in_fp32_and_prints_no_float32_warning(sdxl_base, tmp_path, caplog,
                                                                            monkeypatch):
    """diffusers warned "There are modules in AutoencoderKL that should be kept in float32: []" on every SDXL run:
    the VAE was read in bf16, then cast to fp32 with diffusers' .to(). Now it is read in fp32 from its file."""
    from diffusers import AutoencoderKL

    from finetune.cli import main

    # diffusers' logger does not propagate: caplog listens on it directly
    monkeypatch.setattr(logging.getLogger("diffusers"), "handlers", [caplog.handler])
    recipe = recipe_dict(sdxl_base, draw_concept(tmp_path / "images"), tmp_path / "out",
                         train={"max_steps": 1, "mixed_precision": "bf16"},
                         sample={"every": 1, "prompts": ["a purple sks"], "steps": 1})
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", str(tmp_path / "recipe.yaml")]) == 0
    assert main(["sample", "--base", str(sdxl_base), "--prompt", "x", "--steps", "1", "--num", "1",
                 "--out", str(tmp_path / "x.png")]) == 0
    assert "kept in float32" not in caplog.text
    # the weights are the file's, not rounded to bf16 on the way
    parts = family_for("sdxl").load(str(sdxl_base), dtype=torch.bfloat16)
    stored = AutoencoderKL.from_pretrained(str(sdxl_base / "vae")).state_dict()
    assert all(torch.equal(stored[k], v) for k, v in parts.vae.state_dict().items())
    assert "kept in float32" not in caplog.text


def test_an_sdxl_base_is_told_from_its_folder_its_file_or_its_hub_id(sdxl_base, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from finetune.models.detect import family_of

    assert family_of(str(sdxl_base)) == "sdxl"
    single = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(1),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, str(single))
    assert family_of(str(single)) == "sdxl"
    import huggingface_hub

    # a hub id: its model_index.json alone is fetched (here: from a stand-in for the hub cache)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo, name, revision=None: str(sdxl_base / "model_index.json"))
    assert family_for("auto", "stabilityai/stable-diffusion-xl-base-1.0", hub=True).name == "sdxl"
    assert family_for("auto", "stabilityai/stable-diffusion-xl-base-1.0").name == "sd"  # not looked up


def test_validate_refuses_a_family_that_is_not_the_bases(sdxl_base, tmp_path, capsys):
    from finetune.cli import main

    recipe = recipe_dict(sdxl_base, draw_concept(tmp_path / "images", count=1), tmp_path / "out")
    recipe["model"]["family"] = "sd"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["validate", str(tmp_path / "r.yaml")]) == 2
    assert "model.family: sd, but" in capsys.readouterr().err
    recipe["model"]["family"] = "sdxl"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["validate", str(tmp_path / "r.yaml")]) == 0


def test_a_hypernetwork_works_at_sdxl_widths_and_keys_a1111s_file_by_them(sdxl_base, tmp_path):
    """AUTOMATIC1111 keys a hypernetwork's modules by the context width they rewrite: SDXL's is both CLIPs side
    by side (2048 in the released model, 16 + 32 here); with self_attention also the U-Net's own widths."""
    from finetune import load_adapter
    from finetune.export import hypernetwork as files

    recipe = parse_recipe(recipe_dict(
        sdxl_base, draw_concept(tmp_path / "images"), tmp_path / "out",
        strategy={"kind": "hypernetwork", "self_attention": True, "a1111_pt": True},
        train={"max_steps": 6, "learning_rate": 5e-3, "batch_size": 2}))
    artifact, parts = train_keeping_parts(recipe)
    a1111 = files.read_a1111_pt(tmp_path / "out" / "a1111" / "hypernetwork.pt")
    assert a1111.structure.widths == (16 + 32, 64)  # context; the attention blocks' own width (64 channels)
    trained = images_of(family_for("sdxl").pipeline(parts))
    for path in (artifact, tmp_path / "out" / "a1111" / "hypernetwork.pt"):
        pipe = saved_pipeline(sdxl_base)
        load_adapter(pipe, path)
        np.testing.assert_allclose(images_of(pipe), trained, atol=1e-5)


def test_textual_inversion_writes_one_file_with_clip_l_and_clip_g(sdxl_base, tmp_path):
    """The layout AUTOMATIC1111, ComfyUI and kohya read for SDXL; diffusers loads it with one
    load_textual_inversion call per encoder (as docs/families/sdxl.md shows), finetune.load_adapter with one."""
    from safetensors.torch import load_file

    from finetune import load_adapter

    recipe = parse_recipe(recipe_dict(
        sdxl_base, draw_concept(tmp_path / "images"), tmp_path / "out",
        strategy={"kind": "textual_inversion", "placeholder_token": "<sks>", "initializer_token": "x",
                  "num_vectors": 2},
        train={"max_steps": 6, "learning_rate": 5e-2, "batch_size": 2}))
    artifact, parts = train_keeping_parts(recipe)
    state = load_file(str(artifact))
    assert {k: tuple(v.shape) for k, v in state.items()} == {"clip_l": (2, 16), "clip_g": (2, 32)}
    assert load_file(str(tmp_path / "out" / "a1111" / "sks.safetensors")).keys() == state.keys()
    trained = images_of(family_for("sdxl").pipeline(parts), "a purple <sks>")
    by_hand = saved_pipeline(sdxl_base)
    by_hand.load_textual_inversion(state["clip_l"], token="<sks>", text_encoder=by_hand.text_encoder,
                                   tokenizer=by_hand.tokenizer)
    by_hand.load_textual_inversion(state["clip_g"], token="<sks>", text_encoder=by_hand.text_encoder_2,
                                   tokenizer=by_hand.tokenizer_2)
    ours = saved_pipeline(sdxl_base)
    load_adapter(ours, artifact)
    for pipe in (by_hand, ours):
        np.testing.assert_allclose(images_of(pipe, "a purple <sks>"), trained, atol=1e-5)


def test_dreambooth_writes_an_sdxl_pipeline_that_extract_lora_compacts(sdxl_base, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from finetune import load_adapter
    from finetune.export.extract_lora import extract_lora

    recipe = parse_recipe(recipe_dict(
        sdxl_base, draw_concept(tmp_path / "images"), tmp_path / "out",
        strategy={"kind": "dreambooth", "text_encoder": True},
        train={"max_steps": 4, "learning_rate": 1e-3, "batch_size": 2}))
    folder, parts = train_keeping_parts(recipe)
    tuned = saved_pipeline(folder)
    assert isinstance(tuned, StableDiffusionXLPipeline)
    trained = images_of(tuned)
    np.testing.assert_allclose(trained, images_of(family_for("sdxl").pipeline(parts)), atol=2e-3)
    path, results = extract_lora(str(folder), str(sdxl_base), rank=64, out=tmp_path / "extracted.safetensors")
    assert set(results) == {"unet", "text_encoder", "text_encoder_2"}
    pipe = saved_pipeline(sdxl_base)
    load_adapter(pipe, path)
    # full rank on the tiny model's small layers: the LoRA carries the fine-tune (norms aside, reported)
    assert np.abs(images_of(pipe) - trained).max() < np.abs(images_of(saved_pipeline(sdxl_base)) - trained).max()


def test_merge_writes_an_sdxl_single_file_that_draws_what_base_and_lora_draw(lora_run, sdxl_base, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from finetune.tools.merge import merge

    artifact, parts, _ = lora_run
    out = tmp_path / "merged.safetensors"
    merge(str(sdxl_base), [(str(artifact), 1.0)], out, save_dtype="fp32")
    merged = StableDiffusionXLPipeline.from_single_file(str(out), config=str(sdxl_base))
    merged.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(images_of(merged), images_of(family_for("sdxl").pipeline(parts)), atol=1e-4)


@pytest.mark.parametrize("name", ["sdxl_lora", "sdxl_textual_inversion", "sdxl_dreambooth"])
def test_each_sdxl_recipe_validates_and_trains_on_a_tiny_sdxl(name, sdxl_base, tmp_path):
    """The shipped recipe as it stands, on the tiny SDXL at 32 px for two steps (the real base needs the hub)."""
    tiny_tokenizer = {"sdxl_textual_inversion": ("strategy.initializer_token=x",)}  # "star" is 4 tokens there
    out = train_shipped_recipe(name, sdxl_base, tmp_path, tiny_tokenizer.get(name, ()))
    assert any(out.iterdir())


def test_kohyas_sdxl_names_are_read_without_the_base_as_the_released_sdxl_has_them():
    """SGM names resolve against the released SDXL U-Net (built on the meta device), as diffusers' own mapping and
    kohya's sdxl_original_unet place them."""
    from finetune.export.lora.kohya import name_resolver

    resolve = name_resolver("unet", None)
    assert resolve("input_blocks_4_1_transformer_blocks_0_attn1_to_q") == \
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert resolve("input_blocks_8_1_transformer_blocks_9_attn2_to_k") == \
        "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k"
    assert resolve("middle_block_1_proj_in") == "mid_block.attentions.0.proj_in"
    assert resolve("output_blocks_2_2_conv") == "up_blocks.0.upsamplers.0.conv"
    assert resolve("output_blocks_0_0_in_layers_2") == "up_blocks.0.resnets.0.conv1"


def test_training_can_start_from_a_kohya_sdxl_file(lora_run, sdxl_base, tmp_path):
    artifact, parts, out = lora_run
    trained = images_of(family_for("sdxl").pipeline(parts))
    recipe = parse_recipe(recipe_dict(
        sdxl_base, draw_concept(tmp_path / "images"), tmp_path / "again",
        strategy={"kind": "lora", "initial_weights": str(out / "kohya" / "out.safetensors"), "text_encoder": True},
        train={"max_steps": 1, "learning_rate": 1e-12, "batch_size": 2}))
    _, again = train_keeping_parts(recipe)
    np.testing.assert_allclose(images_of(family_for("sdxl").pipeline(again)), trained, atol=1e-4)
