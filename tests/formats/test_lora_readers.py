"""Our LoRA files as the other programs read them (issue 32, part 6): each reader's formula and key map, written
here as the facts they are, applied to the files a short run writes on the tiny SD3 and Flux (rank 4, alpha 2:
scale 1/2, so a reader that misses alpha is off by 2x), and compared with the change training made to each module.

- ComfyUI (comfy/lora.py `load_lora`, comfy/weight_adapter/lora.py `LoRAAdapter.calculate_weight`) and Forge
  (packages_3rdparty/comfyui_lora_collection/lora.py `load_lora`): change = up @ down * (alpha / rank when the file
  has `<key>.alpha`, else 1); up is `lora_up.weight` or `lora_B.weight`, down `lora_down.weight` or `lora_A.weight`.
- ComfyUI's and Forge's generic key map (`model_lora_keys_unet`): `lora_unet_` + a `diffusion_model.` weight name
  of the original model, underscored. SD3's original (Stability AI) names, read backwards from diffusers'
  `convert_sd3_transformer_checkpoint_to_diffusers`: joint_blocks.N.x_block.attn.qkv = cat(to_q, to_k, to_v),
  context_block.attn.qkv = cat(add_q_proj, add_k_proj, add_v_proj), x_block.attn.proj = to_out.0,
  context_block.attn.proj = to_add_out.
- diffusers' loader: the header's `lora_adapter_metadata` (alpha per component), compared by what the model computes.
"""
from __future__ import annotations

from types import SimpleNamespace

import json

import pytest
import torch
from safetensors.torch import load_file

from finetune.models.base import unwrapped
from finetune.models.tiny import save_tiny_pipeline
from finetune.recipe.load import parse_recipe
from tests.helpers import draw_concept, recipe_dict, saved_pipeline, train_keeping_parts

RANK, ALPHA = 4, 2.0
SAI_FUSED = {"x_block_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
             "context_block_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
SAI_ONE = {"x_block_attn_proj": "attn.to_out.0", "context_block_attn_proj": "attn.to_add_out"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A short LoRA run on the tiny SD3 and Flux, text encoders too, writing both layouts."""
    tmp = tmp_path_factory.mktemp("readers")
    images = draw_concept(tmp / "images")
    out = {}
    for family in ("sd3", "flux"):
        base = save_tiny_pipeline(tmp / f"tiny-{family}", family=family)
        strategy = {"kind": "lora", "rank": RANK, "alpha": ALPHA, "formats": ["diffusers", "kohya"],
                    "text_encoder": True}
        recipe = parse_recipe(recipe_dict(base, images, tmp / family, strategy=strategy,
                                          train={"max_steps": 3, "learning_rate": 1e-2, "batch_size": 2}))
        artifact, parts = train_keeping_parts(recipe)
        out[family] = {"base": base, "diffusers": artifact, "kohya": tmp / family / "kohya" / f"{family}.safetensors",
                       "parts": parts}
    return out


def trained_deltas(parts) -> dict[str, torch.Tensor]:
    """component.module -> the change training made to that module's weight (peft's own computation)."""
    deltas = {}
    for component in ("transformer", "text_encoder", "text_encoder_2"):
        if component not in parts.modules:
            continue
        for name, module in unwrapped(parts.modules[component]).named_modules():
            if hasattr(module, "lora_A") and module.scaling:
                deltas[f"{component}.{name}"] = module.get_delta_weight(next(iter(module.scaling))).float()
    return deltas


def comfy_change(tensors: dict[str, torch.Tensor], stem: str, up_tail: str, down_tail: str) -> torch.Tensor:
    """ComfyUI's and Forge's change for one key stem: alpha / rank only when the file has `<stem>.alpha`."""
    up, down = tensors[stem + up_tail].float(), tensors[stem + down_tail].float()
    scale = tensors[stem + ".alpha"].item() / down.shape[0] if stem + ".alpha" in tensors else 1.0
    return up @ down * scale


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_comfyui_and_forge_apply_the_diffusers_file_at_its_trained_strength(runs, family):
    tensors = load_file(runs[family]["diffusers"])
    trained = trained_deltas(runs[family]["parts"])
    stems = [k.removesuffix(".lora_A.weight") for k in tensors if k.endswith(".lora_A.weight")]
    assert {s.split(".")[0] for s in stems} == {"transformer", "text_encoder", "text_encoder_2"} - \
        ({"text_encoder_2"} if family == "flux" else set())
    assert len(stems) == len(trained)
    for stem in stems:
        # the file keeps CLIP's text_model. level, which transformers 5 dropped from the module path
        module = stem.replace(".text_model.", ".", 1) if stem.startswith("text_encoder") else stem
        if module not in trained:
            module = stem
        torch.testing.assert_close(comfy_change(tensors, stem, ".lora_B.weight", ".lora_A.weight"),
                                   trained[module], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_diffusers_reads_the_header_alpha_as_the_folded_scale(runs, family):
    from safetensors import safe_open

    with safe_open(str(runs[family]["diffusers"]), framework="pt") as handle:
        configs = json.loads(handle.metadata()["lora_adapter_metadata"])
        shapes = {k: handle.get_slice(k).get_shape() for k in handle.keys()}
    for component in ("transformer", "text_encoder"):
        assert configs[f"{component}.r"] == configs[f"{component}.lora_alpha"] == RANK
        assert not configs.get(f"{component}.alpha_pattern")
    assert all(shape[0] == RANK for key, shape in shapes.items() if key.endswith(".lora_A.weight"))


def sd3_prediction(transformer) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return transformer(hidden_states=torch.randn(1, 4, 8, 8, generator=generator),
                           encoder_hidden_states=torch.randn(1, 8, 32, generator=generator),
                           pooled_projections=torch.randn(1, 32, generator=generator),
                           timestep=torch.tensor([500.0]), return_dict=False)[0]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_diffusers_loader_reproduces_the_trained_model(runs, family):
    from tests.helpers import flux_prediction

    predict = sd3_prediction if family == "sd3" else flux_prediction
    run = runs[family]
    pipe = saved_pipeline(run["base"])
    before = predict(pipe.transformer)
    pipe.load_lora_weights(str(run["diffusers"]))  # diffusers' own loader, as its users load it
    expected = predict(unwrapped(run["parts"].transformer))
    assert not torch.allclose(before, expected, atol=1e-4)  # training changed something worth checking
    torch.testing.assert_close(predict(pipe.transformer), expected, rtol=1e-4, atol=1e-5)


def test_the_sd3_kohya_file_is_what_comfyui_and_forge_apply(runs):
    """The SD3 layout both read (Forge ignores `transformer.` names for SD3): every key ComfyUI's and Forge's
    generic map resolves gives the trained change of the modules behind that original weight."""
    tensors = load_file(runs["sd3"]["kohya"])
    trained = trained_deltas(runs["sd3"]["parts"])
    stems = {k.removesuffix(".lora_down.weight") for k in tensors if k.endswith(".lora_down.weight")}
    blocks = {f"joint_blocks_{i}_" for i in range(2)}
    checked = 0
    for stem in stems:
        if not stem.startswith("lora_unet_"):
            continue
        tail = stem.removeprefix("lora_unet_")
        block = next(b for b in blocks if tail.startswith(b))  # every transformer key names a joint block
        index, sai = block.split("_")[2], tail.removeprefix(block)
        members = SAI_FUSED.get(sai) or (SAI_ONE[sai],)
        expected = torch.cat([trained[f"transformer.transformer_blocks.{index}.{m}"] for m in members])
        torch.testing.assert_close(comfy_change(tensors, stem, ".lora_up.weight", ".lora_down.weight"), expected,
                                   rtol=1e-5, atol=1e-6)
        checked += len(members)
    assert checked == len([m for m in trained if m.startswith("transformer.")])
    # CLIP-L and CLIP-G as kohya's SD3 files name them (ComfyUI: lora_te1_ is clip_l, lora_te2_ clip_g)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_") for k in tensors)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_") for k in tensors)


def test_the_sd3_kohya_file_loads_back_to_the_trained_model(runs):
    import finetune

    run = runs["sd3"]
    pipe = saved_pipeline(run["base"])
    finetune.load_adapter(pipe, str(run["kohya"]))
    torch.testing.assert_close(sd3_prediction(pipe.transformer), sd3_prediction(unwrapped(run["parts"].transformer)),
                               rtol=1e-4, atol=1e-5)
    # module by module: a layer the reader skipped (or placed elsewhere) fails here even where its share of the
    # prediction is small
    loaded = trained_deltas(SimpleNamespace(modules={name: getattr(pipe, name) for name in
                                                     ("transformer", "text_encoder", "text_encoder_2")}))
    trained = trained_deltas(run["parts"])
    assert set(loaded) <= set(trained)
    for name, delta in trained.items():
        # a fused module's member that never trained (all-zero up: the last block's context query, whose output
        # SD3 drops) is left out by the split (kohya_flux.split); every other one must be there, exactly
        torch.testing.assert_close(loaded.get(name, torch.zeros_like(delta)), delta, rtol=1e-5, atol=1e-6,
                                   msg=name)


# every Linear of an SD3.5 joint block (dual attention, as SD3.5 Medium's first blocks) and of the top level,
# by its original name: diffusers' converter read backwards (see the module docstring)
SAI_BLOCK = {"x_block_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
             "context_block_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
             "x_block_attn2_qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
             "x_block_attn_proj": ("attn.to_out.0",), "context_block_attn_proj": ("attn.to_add_out",),
             "x_block_attn2_proj": ("attn2.to_out.0",), "x_block_mlp_fc1": ("ff.net.0.proj",),
             "x_block_mlp_fc2": ("ff.net.2",), "context_block_mlp_fc1": ("ff_context.net.0.proj",),
             "context_block_mlp_fc2": ("ff_context.net.2",), "x_block_adaLN_modulation_1": ("norm1.linear",)}
SAI_TOP = {"context_embedder": "context_embedder", "t_embedder_mlp_0": "time_text_embed.timestep_embedder.linear_1",
           "t_embedder_mlp_2": "time_text_embed.timestep_embedder.linear_2",
           "y_embedder_mlp_0": "time_text_embed.text_embedder.linear_1",
           "y_embedder_mlp_2": "time_text_embed.text_embedder.linear_2", "final_layer_linear": "proj_out"}


@pytest.fixture(scope="module")
def sd35_lora(tmp_path_factory):
    """A tiny SD3.5-shaped transformer (dual attention in block 0, RMS q/k norms) with a LoRA (rank 2, alpha 3) on
    every Linear kohya's SD3 layout names, random ups, saved as a diffusers-layout file of an SD3 run."""
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig

    from finetune.export.lora import diffusers as diffusers_lora
    from finetune.networks import peft_layers

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
        pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
    skipped = ("norm1_context.linear", "norm_out.linear")  # their weights are reordered by diffusers: refused
    linear = sorted(n for n, m in transformer.named_modules()
                    if isinstance(m, torch.nn.Linear) and not n.endswith(skipped))
    config = LoraConfig(r=2, lora_alpha=3, target_modules=linear)
    peft_layers.inject(transformer, config)
    for name, parameter in transformer.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.2)
    deltas = {n: m.get_delta_weight(next(iter(m.scaling))).float() for n, m in transformer.named_modules()
              if hasattr(m, "lora_A") and m.scaling}
    folder = tmp_path_factory.mktemp("sd35")
    path = diffusers_lora.save_lora(folder / "sd35.safetensors", {"transformer": peft_layers.state_dict(transformer)},
                                    {"transformer": config.to_dict()}, {"ss_base_model_version": "sd3"})
    return {"path": path, "deltas": deltas, "folder": folder, "linear": linear}


def test_every_sd35_module_converts_to_what_comfyui_and_forge_apply(sd35_lora):
    from finetune.cli import main
    from finetune.export.lora.files import read_lora

    kohya = sd35_lora["folder"] / "kohya.safetensors"
    assert main(["convert", str(sd35_lora["path"]), str(kohya), "--to", "kohya"]) == 0
    tensors, deltas = load_file(kohya), sd35_lora["deltas"]
    covered = set()
    for stem in {k.removesuffix(".lora_down.weight") for k in tensors if k.endswith(".lora_down.weight")}:
        tail = stem.removeprefix("lora_unet_")
        if tail in SAI_TOP:
            members = [SAI_TOP[tail]]
        else:
            index, sai = tail.removeprefix("joint_blocks_").split("_", 1)
            members = [f"transformer_blocks.{index}.{m}" for m in SAI_BLOCK[sai]]
        expected = torch.cat([deltas[m] for m in members])
        torch.testing.assert_close(comfy_change(tensors, stem, ".lora_up.weight", ".lora_down.weight"), expected,
                                   rtol=1e-5, atol=1e-6, msg=stem)
        covered.update(members)
    assert covered == set(deltas) and any("attn2" in m for m in covered)
    back = read_lora(kohya).layers["transformer"]  # and the file reads back into the same changes
    assert set(back) == set(deltas)
    for module, layer in back.items():
        torch.testing.assert_close(layer.delta(), deltas[module], rtol=1e-5, atol=1e-6, msg=module)


def test_an_sd3_module_the_layout_cannot_hold_is_refused_by_name(sd35_lora, tmp_path, capsys):
    from finetune.cli import main

    tensors = load_file(sd35_lora["path"])
    tensors["transformer.norm_out.linear.lora_A.weight"] = torch.zeros(2, 16)
    tensors["transformer.norm_out.linear.lora_B.weight"] = torch.zeros(32, 2)
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(sd35_lora["path"]), framework="pt") as handle:
        header = handle.metadata()
    source = tmp_path / "with_norm_out.safetensors"
    save_file(tensors, str(source), metadata=header)
    assert main(["convert", str(source), str(tmp_path / "out.safetensors"), "--to", "kohya"]) == 2
    assert "transformer.norm_out.linear has no place in kohya's SD3 layout" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()


def test_lycoris_on_sd3_with_kohya_is_refused_before_training(runs):
    from finetune.models import family_for
    from finetune.strategies import create_strategy
    from finetune.strategies.base import StrategySetupError

    base = runs["sd3"]["base"]
    options = parse_recipe(recipe_dict(base, ".", "out", strategy={
        "kind": "lora", "variant": "loha", "formats": ["diffusers", "kohya"]})).strategy
    family = family_for("sd3")
    with pytest.raises(StrategySetupError, match="kohya's SD3 layout fuses q/k/v, and a loha"):
        create_strategy(options).check(family, family.load(str(base)))
