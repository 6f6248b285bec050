"""kohya's Flux LoRA layout (BFL's module names, q/k/v fused; finetune/export/lora/kohya_flux.py) written by
`strategy.formats: [kohya]` and read by load_adapter, convert and initial_weights, and the target presets
(`strategy.target_preset`; its refusals: test_lora_presets.py) on a tiny Flux. Every check compares what the
models compute: a layer dropped on the way changes the transformer's prediction."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import finetune
from finetune.cli import main
from finetune.export.lora.files import read_lora, read_tensors
from finetune.models import family_for
from finetune.models.base import unwrapped
from finetune.models.tiny import save_tiny_pipeline
from finetune.recipe.load import parse_recipe
from tests.helpers import (
    draw_concept,
    flux_prediction,
    images_of,
    recipe_dict,
    saved_pipeline,
    train_keeping_parts,
)

ATTENTION = {f"transformer_blocks.0.attn.{m}" for m in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj",
                                                         "add_k_proj", "add_v_proj", "to_add_out")} | \
            {f"single_transformer_blocks.0.attn.{m}" for m in ("to_q", "to_k", "to_v")}
MLPS = {f"transformer_blocks.0.{m}" for m in ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                                              "ff_context.net.2")} | \
       {"single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.proj_out"}
MODULATIONS = {"transformer_blocks.0.norm1.linear", "transformer_blocks.0.norm1_context.linear",
               "single_transformer_blocks.0.norm.linear"}
PRESETS = {"attention": ATTENTION, "attention_mlp": ATTENTION | MLPS, "all_linear": ATTENTION | MLPS | MODULATIONS}
# kohya module stems (after lora_unet_) per preset, and the members each fused one holds
STEMS = {"attention": {"double_blocks_0_img_attn_qkv", "double_blocks_0_img_attn_proj", "double_blocks_0_txt_attn_qkv",
                       "double_blocks_0_txt_attn_proj", "single_blocks_0_linear1"}}
STEMS["attention_mlp"] = STEMS["attention"] | {"double_blocks_0_img_mlp_0", "double_blocks_0_img_mlp_2",
                                               "double_blocks_0_txt_mlp_0", "double_blocks_0_txt_mlp_2",
                                               "single_blocks_0_linear2"}
STEMS["all_linear"] = STEMS["attention_mlp"] | {"double_blocks_0_img_mod_lin", "double_blocks_0_txt_mod_lin",
                                                "single_blocks_0_modulation_lin"}
RANK, ALPHA = 2, 4.0


@pytest.fixture(scope="module")
def flux_base(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-flux", family="flux")


@pytest.fixture(scope="module")
def runs(flux_base, tmp_path_factory):
    """One short LoRA run per preset writing both files; all_linear adapts CLIP-L too."""
    tmp = tmp_path_factory.mktemp("kohya-flux")
    images = draw_concept(tmp / "images")
    out = {}
    for preset in PRESETS:
        strategy = {"kind": "lora", "rank": RANK, "alpha": ALPHA, "target_preset": preset,
                    "formats": ["diffusers", "kohya"], "text_encoder": preset == "all_linear"}
        recipe = parse_recipe(recipe_dict(flux_base, images, tmp / preset, strategy=strategy,
                                          train={"max_steps": 4, "learning_rate": 1e-2, "batch_size": 2}))
        artifact, parts = train_keeping_parts(recipe)
        out[preset] = {"diffusers": artifact, "kohya": tmp / preset / "kohya" / f"{preset}.safetensors",
                       "parts": parts, "prediction": flux_prediction(unwrapped(parts.transformer))}
    return out


def loaded(base, path) -> torch.Tensor:
    pipe = saved_pipeline(base)
    finetune.load_adapter(pipe, str(path))
    return flux_prediction(pipe.transformer)


def adapted(module) -> set[str]:
    return {name for name, child in module.named_modules() if hasattr(child, "lora_A")}


@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_adapts_its_modules_in_both_block_kinds(runs, preset):
    assert adapted(unwrapped(runs[preset]["parts"].transformer)) == PRESETS[preset]


@pytest.mark.parametrize("preset", PRESETS)
def test_the_kohya_file_names_bfl_modules_with_q_k_v_fused(runs, preset):
    """lora_unet_ + BFL's names; a fused module stacks its members' downs and puts their ups block-diagonally
    (alpha x members, so alpha / rank stays), proj_mlp's rows zero where it did not train."""
    tensors, header = read_tensors(runs[preset]["kohya"])
    unet = {k.removeprefix("lora_unet_").partition(".")[0] for k in tensors if k.startswith("lora_unet_")}
    assert unet == STEMS[preset]
    assert ({k.partition("_text_model")[0] for k in tensors if not k.startswith("lora_unet_")}
            == ({"lora_te1"} if preset == "all_linear" else set()))
    qkv, linear1 = "lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1"
    members = 4 if preset != "attention" else 3
    assert tensors[f"{qkv}.lora_down.weight"].shape == (3 * RANK, 32)
    assert tensors[f"{qkv}.lora_up.weight"].shape == (3 * 32, 3 * RANK)
    assert float(tensors[f"{qkv}.alpha"]) == 3 * ALPHA
    up = tensors[f"{linear1}.lora_up.weight"]
    assert up.shape == (3 * 32 + 128, members * RANK) and float(tensors[f"{linear1}.alpha"]) == members * ALPHA
    assert torch.count_nonzero(up[:32, RANK:]) == 0 and torch.count_nonzero(up[32:64, :RANK]) == 0
    assert torch.count_nonzero(up[96:]) == (0 if preset == "attention" else torch.count_nonzero(up[96:, 3 * RANK:]))
    assert header["ss_base_model_version"] == "flux1" and header["ss_network_module"] == "networks.lora_flux"
    assert header["modelspec.architecture"] == "flux-1-dev/lora" and header["ss_network_dim"] == str(RANK)


@pytest.mark.parametrize("preset", PRESETS)
def test_load_adapter_of_the_kohya_file_reproduces_the_trained_model(runs, flux_base, preset):
    run = runs[preset]
    assert (run["prediction"] - flux_prediction(saved_pipeline(flux_base).transformer)).abs().max() > 1e-3
    torch.testing.assert_close(loaded(flux_base, run["kohya"]), run["prediction"], atol=1e-5, rtol=0)
    if preset == "all_linear":  # CLIP-L's lora_te1_ layers too: the images as trained
        pipe = saved_pipeline(flux_base)
        finetune.load_adapter(pipe, str(run["kohya"]))
        trained = images_of(family_for("flux").pipeline(run["parts"]), guidance_scale=3.5)
        np.testing.assert_allclose(images_of(pipe, guidance_scale=3.5), trained, atol=1e-5)


def test_a_fused_module_left_out_changes_the_output(runs, flux_base, tmp_path):
    """What the comparisons above rest on: each fused module's LoRA matters to the prediction."""
    tensors, header = read_tensors(runs["all_linear"]["kohya"])
    for stem in ("lora_unet_double_blocks_0_txt_attn_qkv", "lora_unet_single_blocks_0_linear1"):
        path = tmp_path / f"without-{stem}.safetensors"
        save_file({k: v for k, v in tensors.items() if not k.startswith(stem)}, str(path), header)
        assert (loaded(flux_base, path) - runs["all_linear"]["prediction"]).abs().max() > 1e-4, stem


def test_kohya_to_diffusers_to_kohya_is_exact_and_compact(runs, tmp_path):
    """convert without a base: the fused pairs split back into the trained rank-2 LoRAs, bit for bit, and fuse
    again into the same file."""
    run = runs["all_linear"]
    middle, again = tmp_path / "diffusers.safetensors", tmp_path / "kohya.safetensors"
    assert main(["convert", str(run["kohya"]), str(middle), "--to", "diffusers"]) == 0
    assert main(["convert", str(middle), str(again), "--to", "kohya"]) == 0
    first, _ = read_tensors(run["kohya"])
    second, header = read_tensors(again)
    assert set(first) == set(second) and header["ss_base_model_version"] == "flux1"
    # the diffusers file folds alpha / rank into its ups (alpha = rank), so the same change comes back, not the
    # same alphas: every module's up @ down * alpha / rank is compared
    again_layers, first_layers = read_lora(again), read_lora(run["kohya"])
    for component, module, layer in first_layers.modules():
        other = again_layers.layers[component][module]
        assert torch.equal(other.down, layer.down), module
        torch.testing.assert_close(other.delta(), layer.delta(), rtol=1e-6, atol=1e-7, msg=module)
    trained, split = read_lora(run["diffusers"]), read_lora(middle)
    assert {c: set(m) for c, m in trained.layers.items()} == {c: set(m) for c, m in split.layers.items()}
    for component, module, layer in trained.modules():
        other = split.layers[component][module]
        assert other.rank == RANK and other.alpha == layer.alpha, module
        assert torch.equal(other.down, layer.down), module
        torch.testing.assert_close(other.up, layer.up, rtol=1e-6, atol=1e-7, msg=module)


def test_initial_weights_from_the_kohya_file_start_where_training_ended(runs, flux_base, tmp_path):
    from finetune.strategies import create_strategy

    run = runs["attention_mlp"]
    recipe = parse_recipe(recipe_dict(flux_base, draw_concept(tmp_path / "images", count=1), tmp_path / "out",
                                      strategy={"kind": "lora", "initial_weights": str(run["kohya"])}))
    strategy, family = create_strategy(recipe.strategy), family_for("flux")
    parts = family.load(str(flux_base))
    strategy.check(family, parts)
    strategy.prepare(family, parts)
    assert adapted(parts.transformer) == PRESETS["attention_mlp"]
    assert {layer.rank for layer in strategy.start.layers["transformer"].values()} == {RANK}  # compact again
    torch.testing.assert_close(flux_prediction(parts.transformer), run["prediction"], atol=1e-5, rtol=0)


def test_a_kohya_trained_fused_file_loads_as_its_math_says(flux_base, tmp_path):
    """kohya trains one down per fused module: q, k and v (and proj_mlp) share it and take their rows of the up.
    Loaded, it computes what the base with up @ down x alpha / rank added to those rows computes."""
    generator = torch.Generator().manual_seed(1)
    rank, alpha = 3, 1.5
    fused = {"double_blocks_0_img_attn_qkv": ("transformer_blocks.0.attn.", ("to_q", "to_k", "to_v"), 96),
             "double_blocks_0_txt_attn_qkv": ("transformer_blocks.0.attn.", ("add_q_proj", "add_k_proj",
                                                                               "add_v_proj"), 96),
             "single_blocks_0_linear1": ("single_transformer_blocks.0.", ("attn.to_q", "attn.to_k", "attn.to_v",
                                                                          "proj_mlp"), 224)}
    tensors = {}
    expected = saved_pipeline(flux_base).transformer
    for stem, (prefix, members, width) in fused.items():
        down, up = torch.randn(rank, 32, generator=generator) * 0.3, torch.randn(width, rank, generator=generator) * 0.3
        tensors.update({f"lora_unet_{stem}.lora_down.weight": down, f"lora_unet_{stem}.lora_up.weight": up,
                        f"lora_unet_{stem}.alpha": torch.tensor(alpha)})
        rows = [32, 32, 32, width - 96][:len(members)]
        for member, block in zip(members, torch.split(up, rows)):
            expected.get_submodule(prefix + member).weight.data += block @ down * (alpha / rank)
    path = tmp_path / "kohya_trained.safetensors"
    save_file(tensors, str(path))
    layers = read_lora(path).layers["transformer"]
    assert len(layers) == 10 and {layer.rank for layer in layers.values()} == {rank}
    assert torch.equal(layers["transformer_blocks.0.attn.to_k"].down, layers["transformer_blocks.0.attn.to_q"].down)
    torch.testing.assert_close(loaded(flux_base, path), flux_prediction(expected), atol=1e-5, rtol=0)


def test_a_t5_layer_is_refused_by_name(runs, tmp_path):
    from finetune.export.lora.layers import LoraFileError

    tensors, _ = read_tensors(runs["attention"]["kohya"])
    tensors["lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight"] = torch.zeros(2, 32)
    save_file(tensors, str(tmp_path / "t5.safetensors"))
    with pytest.raises(LoraFileError, match="adapts T5-XXL"):
        read_lora(tmp_path / "t5.safetensors")


def test_diffusers_own_loader_reads_our_kohya_file(runs, flux_base, tmp_path):
    """FluxPipeline.load_lora_weights (diffusers' kohya converter) gives what finetune.load_adapter gives, for
    what the converter can place on a tiny Flux: it splits single blocks' linear1 at Flux.1's hard-coded widths
    (3072 x 3 + 12288), which a 32-wide model does not have, so those keys are left out here (families.md)."""
    tensors, header = read_tensors(runs["all_linear"]["kohya"])
    path = tmp_path / "without_linear1.safetensors"
    save_file({k: v for k, v in tensors.items() if "_linear1." not in k}, str(path), header)
    theirs = saved_pipeline(flux_base)
    theirs.load_lora_weights(str(path))
    ours = saved_pipeline(flux_base)
    finetune.load_adapter(ours, str(path))
    base = images_of(saved_pipeline(flux_base), guidance_scale=3.5)
    assert np.abs(images_of(ours, guidance_scale=3.5) - base).max() > 1e-3
    np.testing.assert_allclose(images_of(theirs, guidance_scale=3.5), images_of(ours, guidance_scale=3.5), atol=1e-5)
    torch.testing.assert_close(flux_prediction(theirs.transformer), flux_prediction(ours.transformer), atol=1e-5, rtol=0)


def test_every_linear_of_the_transformer_has_a_kohya_name(flux_base, tmp_path):
    """Embedders and final layer too (what ai-toolkit and kohya's in_dims train): a diffusers-layout LoRA on every
    Linear converts to kohya's names and back exactly; diffusers' converter, which swaps the final layer's
    (shift, scale) halves on its own, gets the trained up back, and its loader reads the same blocks."""
    from diffusers import FluxPipeline
    from peft import LoraConfig

    from finetune.export.lora import diffusers as diffusers_lora
    from finetune.networks import peft_layers

    pipe = saved_pipeline(flux_base)
    linear = sorted(n for n, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear))
    config = LoraConfig(r=2, lora_alpha=3, target_modules=linear)
    peft_layers.inject(pipe.transformer, config)
    torch.manual_seed(2)
    for name, parameter in pipe.transformer.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.2)
    expected, state = flux_prediction(pipe.transformer), peft_layers.state_dict(pipe.transformer)
    source = diffusers_lora.save_lora(tmp_path / "all.safetensors", {"transformer": state},
                                      {"transformer": config.to_dict()}, {})
    kohya = tmp_path / "all_kohya.safetensors"
    assert main(["convert", str(source), str(kohya), "--to", "kohya"]) == 0
    tensors, _ = read_tensors(kohya)
    for stem in ("img_in", "txt_in", "time_in_in_layer", "vector_in_out_layer", "guidance_in_in_layer",
                 "final_layer_linear", "final_layer_adaLN_modulation_1"):
        assert f"lora_unet_{stem}.lora_up.weight" in tensors, stem
    torch.testing.assert_close(loaded(flux_base, kohya), expected, atol=1e-5, rtol=0)
    without = tmp_path / "no_linear1.safetensors"  # its linear1 split needs Flux.1's widths (see above)
    save_file({k: v for k, v in tensors.items() if "_linear1." not in k}, str(without))
    converted = FluxPipeline.lora_state_dict(str(without))
    converted = converted[0] if isinstance(converted, tuple) else converted
    # the diffusers file holds alpha / rank (3 / 2) folded into lora_B
    torch.testing.assert_close(converted["norm_out.linear.lora_B.weight"],
                               state["norm_out.linear.lora_B.weight"] * 1.5)
    # its converter names the embedders and the final layer without the `transformer.` prefix, so its loader
    # drops them (and it applies no alpha to the final layer, "TODO: alphas"): only the blocks are compared
    blocks = tmp_path / "blocks.safetensors"
    save_file({k: v for k, v in tensors.items() if "_blocks_" in k and "_linear1." not in k}, str(blocks))
    theirs = saved_pipeline(flux_base)
    theirs.load_lora_weights(str(blocks))
    ours = loaded(flux_base, blocks)
    assert (ours - flux_prediction(saved_pipeline(flux_base).transformer)).abs().max() > 1e-3
    torch.testing.assert_close(flux_prediction(theirs.transformer), ours, atol=1e-5, rtol=0)
