"""ComfyUI's LoRA layout (finetune/export/lora/comfyui.py): `diffusion_model.` + the original model's module names,
fused where the original fuses, from a family's declared OriginalNames. Checked here on Flux.1's BFL names (the
tables kohya's Flux layout uses), against kohya_flux's own fusing; each family with a ComfyUI layout is checked
end to end (trained, written, read back, loaded) by its own tests under tests/families/."""
from __future__ import annotations

import pytest
import torch

from finetune.export.lora import comfyui, kohya_flux
from finetune.export.lora.layers import LoraFileError, LoraLayer, LoraWeights
from finetune.models.family import OriginalNames

BFL = OriginalNames(
    blocks={"transformer_blocks": "double_blocks", "single_transformer_blocks": "single_blocks"},
    renamed={"transformer_blocks": kohya_flux.DOUBLE, "single_transformer_blocks": kohya_flux.SINGLE},
    fused={"transformer_blocks": kohya_flux.DOUBLE_FUSED, "single_transformer_blocks": kohya_flux.SINGLE_FUSED},
    top={k: v for k, v in kohya_flux.TOP.items() if v != kohya_flux.SWAPPED}, widths={"proj_mlp": 4})


def _layer(out: int, inner: int = 8, rank: int = 2, seed: int = 0) -> LoraLayer:
    generator = torch.Generator().manual_seed(seed)
    return LoraLayer(torch.randn(rank, inner, generator=generator), torch.randn(out, rank, generator=generator), 4.0)


def _layers() -> dict[str, LoraLayer]:
    # q/k/v of a double block (add_v_proj untrained), a single block's q/k/v without proj_mlp, renamed modules
    return {"transformer_blocks.0.attn.to_q": _layer(8, seed=1), "transformer_blocks.0.attn.to_k": _layer(8, seed=2),
            "transformer_blocks.0.attn.to_v": _layer(8, seed=3), "transformer_blocks.0.attn.add_q_proj": _layer(8, seed=4),
            "transformer_blocks.0.attn.add_k_proj": _layer(8, seed=5), "transformer_blocks.0.attn.to_out.0": _layer(8, seed=6),
            "single_transformer_blocks.1.attn.to_q": _layer(8, seed=7),
            "single_transformer_blocks.1.attn.to_k": _layer(8, seed=8),
            "single_transformer_blocks.1.attn.to_v": _layer(8, seed=9), "single_transformer_blocks.1.proj_out": _layer(8, 40, seed=10),
            "x_embedder": _layer(8, 16, seed=11)}


def test_the_original_names_fuse_as_kohyas_flux_layout_does_and_read_back_exactly():
    layers = _layers()
    original = comfyui.to_original(layers, BFL)
    kohya = kohya_flux.to_bfl(layers)
    assert set(original) == set(kohya)
    for name in original:
        torch.testing.assert_close(original[name].delta(), kohya[name].delta(), rtol=0, atol=0)
    assert original["single_blocks.1.linear1"].up.shape[0] == 3 * 8 + 4 * 8  # proj_mlp's rows, zero, 4x wide
    back = comfyui.from_original(original, BFL, "test")
    assert set(back) == set(layers)  # untrained members (add_v_proj, proj_mlp) are left out again
    for name, layer in layers.items():
        torch.testing.assert_close(back[name].delta(), layer.delta(), rtol=0, atol=1e-6)


def test_a_file_is_written_and_read_back_with_alpha_folded_in(tmp_path):
    weights = LoraWeights({"transformer": _layers()}, {"finetune.strategy": "lora"})
    path = comfyui.write_comfyui(weights, tmp_path / "x.safetensors", BFL)
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    assert comfyui.is_comfyui(list(tensors)) and all(k.startswith("diffusion_model.") for k in tensors)
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight" in tensors
    assert not any(k.endswith(".alpha") for k in tensors)
    read = comfyui.from_comfyui(tensors, {}, str(path), BFL)
    for name, layer in _layers().items():
        torch.testing.assert_close(read.layers["transformer"][name].delta(), layer.delta(), rtol=0, atol=1e-5)


def test_a_module_the_layout_has_no_place_for_is_named():
    with pytest.raises(LoraFileError, match="transformer.transformer_blocks.0.norm1.norm has no place"):
        comfyui.to_original({"transformer_blocks.0.norm1.norm": _layer(8)}, BFL)


def test_a_family_whose_original_names_are_diffusers_keeps_the_paths():
    layers = {"transformer_blocks.3.attn.to_q": _layer(8)}
    assert set(comfyui.to_original(layers, OriginalNames())) == set(layers)
    assert set(comfyui.from_original(layers, OriginalNames(), "x")) == set(layers)
