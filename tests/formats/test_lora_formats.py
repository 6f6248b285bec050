"""LoRA files that travel: kohya export and import, convert, resize, inspect (issue 8), on the tiny pipeline."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from finetune.cli import main
from finetune.export.lora import files as lora_layers  # read_lora, read_tensors
from finetune.export.lora import kohya as kohya_lora
from finetune.export.lora.layers import LoraFileError
from tests.helpers import images as _images, pipeline as _pipe

def _loaded(tiny_base, path):
    pipe = _pipe(tiny_base)
    pipe.load_lora_weights(str(path))  # diffusers' own loader, as any diffusers user would load it
    return pipe


def test_kohya_keys_alpha_and_header(lora_file, tmp_path):
    out = tmp_path / "my_style.safetensors"
    assert main(["convert", str(lora_file), str(out), "--to", "kohya"]) == 0
    tensors = load_file(out)
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert tensors[f"{stem}.lora_down.weight"].shape == (4, 32)
    assert tensors[f"{stem}.lora_up.weight"].shape == (32, 4)
    # the diffusers file holds alpha / rank (2 / 4) folded into its weights, so its kohya twin's alpha is the rank
    assert tensors[f"{stem}.alpha"].item() == 4.0 and tensors[f"{stem}.alpha"].ndim == 0
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (4, 32, 3, 3)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in tensors
    assert not any(".lora_A." in k for k in tensors)
    with safe_open(str(out), framework="pt") as handle:
        header = handle.metadata()
    assert header["ss_network_module"] == "networks.lora"
    assert header["ss_network_dim"] == "4" and header["ss_network_alpha"] == "4"
    assert header["ss_output_name"] == "my_style" and header["ss_base_model_version"] == "sd_v1"
    assert header["ss_learning_rate"] == "0.0001" and header["ss_seed"] == "5" and header["ss_steps"] == "7"
    assert json.loads(header["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "4"}
    assert header["finetune.base_model"]  # our own metadata travels too
    # the hash the UIs check: SHA-256 of the tensor bytes after the header
    raw = out.read_bytes()
    import hashlib

    assert header["sshs_model_hash"] == hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little"):]).hexdigest()


def test_kohya_file_through_diffusers_loader_gives_the_same_images(tiny_base, lora_file, tmp_path):
    out = tmp_path / "k.safetensors"
    assert main(["convert", str(lora_file), str(out), "--to", "kohya"]) == 0
    ours = _images(_loaded(tiny_base, lora_file))
    theirs = _images(_loaded(tiny_base, out))
    base = _images(_pipe(tiny_base))
    assert np.abs(ours - base).max() > 0.05  # the LoRA changes the images, so equality means something
    np.testing.assert_allclose(theirs, ours, atol=1e-5)


def test_kohya_round_trip_is_exact_with_and_without_the_base(tiny_base, lora_file, tmp_path):
    kohya, back, matched = tmp_path / "k.safetensors", tmp_path / "back.safetensors", tmp_path / "m.safetensors"
    assert main(["convert", str(lora_file), str(kohya), "--to", "kohya"]) == 0
    assert main(["convert", str(kohya), str(back), "--to", "diffusers"]) == 0  # names parsed
    assert main(["convert", str(kohya), str(matched), "--to", "diffusers", "--base", str(tiny_base)]) == 0
    original = lora_layers.read_lora(lora_file)
    for path in (back, matched):
        again = lora_layers.read_lora(path)
        for component, module, layer in original.modules():
            assert torch.equal(again.layers[component][module].delta(), layer.delta()), module
        assert {c: set(m) for c, m in again.layers.items()} == {c: set(m) for c, m in original.layers.items()}
    np.testing.assert_allclose(_images(_loaded(tiny_base, back)), _images(_loaded(tiny_base, lora_file)), atol=1e-5)


def test_kohya_names_from_another_base_are_refused(tiny_base, tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"lora_unet_down_blocks_3_attentions_9_proj_in.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_down_blocks_3_attentions_9_proj_in.lora_up.weight": torch.zeros(8, 2)}, str(path))
    with pytest.raises(LoraFileError, match="another base model"):
        lora_layers.read_lora(path, {"unet": ["down_blocks.0.attentions.0.proj_in"]})


def test_module_path_parsing():
    assert kohya_lora.parse_module_path("down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_out_0") == \
        "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0"
    assert kohya_lora.parse_module_path("up_blocks_1_resnets_2_conv_shortcut") == "up_blocks.1.resnets.2.conv_shortcut"
    assert kohya_lora.parse_module_path("mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj") == \
        "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"
    with pytest.raises(LoraFileError, match="--base"):
        kohya_lora.parse_module_path("no_such_layer_name")


def test_resize_at_full_rank_is_lossless(tiny_base, lora_file, tmp_path):
    out, report = tmp_path / "full.safetensors", tmp_path / "report.json"
    assert main(["resize", str(lora_file), str(out), "--rank", "64", "--json", str(report)]) == 0
    layers = json.loads(report.read_text())
    assert all(abs(r["energy_kept"] - 1.0) < 1e-9 for r in layers)
    np.testing.assert_allclose(_images(_loaded(tiny_base, out)), _images(_loaded(tiny_base, lora_file)), atol=1e-4)


def test_resize_to_lower_rank_reports_the_energy_it_keeps(lora_file, tmp_path, capsys):
    out, report = tmp_path / "r2.safetensors", tmp_path / "report.json"
    assert main(["resize", str(lora_file), str(out), "--rank", "2", "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "energy kept per layer" in printed and "rank 2-4 -> 2" in printed
    original, resized = lora_layers.read_lora(lora_file), lora_layers.read_lora(out)
    reported = {(r["component"], r["module"]): r for r in json.loads(report.read_text())}
    for component, module, layer in original.modules():
        new = resized.layers[component][module]
        assert new.rank == min(2, layer.rank)
        # energy kept is the share of the change's squared norm that the smaller layer reproduces
        delta, approx = layer.delta().double(), new.delta().double()
        kept = 1 - (delta - approx).square().sum() / delta.square().sum()
        assert reported[(component, module)]["energy_kept"] == pytest.approx(float(kept), abs=1e-5)
    assert min(r["energy_kept"] for r in reported.values()) < 0.99  # rank 2 of 4 loses something


def test_resize_to_an_energy_fraction_keeps_at_least_that(lora_file, tmp_path):
    out, report = tmp_path / "e.safetensors", tmp_path / "report.json"
    assert main(["resize", str(lora_file), str(out), "--energy", "0.8", "--json", str(report)]) == 0
    layers = json.loads(report.read_text())
    assert all(r["energy_kept"] >= 0.8 - 1e-9 for r in layers)
    assert any(r["new_rank"] < r["old_rank"] for r in layers)


def test_resize_keeps_the_kohya_format(lora_file, tmp_path):
    kohya, out = tmp_path / "k.safetensors", tmp_path / "k2.safetensors"
    assert main(["convert", str(lora_file), str(kohya), "--to", "kohya"]) == 0
    assert main(["resize", str(kohya), str(out), "--rank", "1"]) == 0
    header = lora_layers.read_tensors(out)[1]
    assert header["ss_network_dim"] == "1" and lora_layers.read_lora(out).format == "kohya"


def test_resize_bad_arguments_exit_2(lora_file, tmp_path, capsys):
    assert main(["resize", str(lora_file), str(tmp_path / "x.safetensors")]) == 2
    assert "--rank" in capsys.readouterr().err
    assert main(["resize", str(lora_file), str(tmp_path / "x.safetensors"), "--energy", "1.5"]) == 2
    assert not (tmp_path / "x.safetensors").exists()


def test_inspect_names_format_base_metadata_and_shapes(lora_file, tmp_path, capsys):
    kohya = tmp_path / "k.safetensors"
    assert main(["convert", str(lora_file), str(kohya), "--to", "kohya"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(kohya), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"].startswith("LoRA (kohya")
    assert info["lora"] == {"unet": {"modules": 44, "ranks": {"4": 44}},
                            "text_encoder": {"modules": 10, "ranks": {"2": 10}}}
    assert info["metadata"]["ss_network_dim"] == "4"
    assert info["shapes"]["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"] == [4, 32, 3, 3]
    assert main(["inspect", str(lora_file)]) == 0
    text = capsys.readouterr().out
    assert "LoRA (diffusers/peft format)" in text and "base_model:" in text
    assert main(["inspect", str(tmp_path / "missing.safetensors")]) == 2


def test_inspect_tells_each_kind_of_file(tiny_base, tmp_path, capsys):
    from finetune.export.single_file import save_single_file
    from finetune.export.textual_inversion import save_a1111_pt

    pipe = _pipe(tiny_base)
    checkpoint = save_single_file(tmp_path / "model.safetensors", pipe.unet, pipe.vae, pipe.text_encoder)
    pt = save_a1111_pt(torch.randn(2, 32), tmp_path / "sks.pt", "<sks>", step=3, base_model="tiny")
    embedding = tmp_path / "learned_embeds.safetensors"
    save_file({"<sks>": torch.randn(2, 32)}, str(embedding))
    expected = {checkpoint: "single-file checkpoint", pt: "AUTOMATIC1111 .pt", embedding: "diffusers format",
                tiny_base: "diffusers pipeline"}
    for path, kind in expected.items():
        capsys.readouterr()
        assert main(["inspect", str(path), "--json"]) == 0
        assert kind in json.loads(capsys.readouterr().out)["kind"], path


def test_every_sd15_module_name_parses_back_without_the_model():
    """kohya names of every Linear/Conv2d in an SD1.5-shaped U-Net and CLIP (built on the meta device, no
    memory) come back as the module paths, so converting a civitai LoRA needs no base model."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel(), "text_encoder": CLIPTextModel(CLIPTextConfig())}
    checked = 0
    for component, model in models.items():
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                kohya = kohya_lora.kohya_module(component, name)
                underscored = kohya.split("_", 2)[2]  # without lora_unet_ / lora_te_
                parsed = kohya_lora.name_resolver(component, None)(underscored)
                assert parsed == name, (kohya, parsed)
                checked += 1
    assert checked > 300  # SD1.5: 192 + 72 LoRA targets, plus the ResNet convolutions
