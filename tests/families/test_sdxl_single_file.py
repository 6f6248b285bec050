"""SDXL single-file export: an SGM-layout (A1111/ComfyUI) checkpoint that diffusers' from_single_file rebuilds
bit-identically, the same image from the same seed."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from finetune.export.single_file import UNET_PREFIX, VAE_PREFIX, SingleFileExportError
from finetune.export.single_file_sdxl import (
    CLIP_G_PREFIX, CLIP_L_PREFIX, save_single_file_sdxl, to_sgm_state_dict)
from finetune.io.safetensors_io import read_metadata
from finetune.models.base import Components

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
PREFIXES = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": CLIP_L_PREFIX, "text_encoder_2": CLIP_G_PREFIX}
IMAGE = {"prompt": "a purple sks", "num_inference_steps": 2, "height": 32, "width": 32, "output_type": "np"}


@pytest.fixture(scope="module")
def config_folder(tmp_path_factory):
    """The configs from_single_file is given; its weights (seed 0) are not the exported ones (seed 1)."""
    from finetune.models.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("sdxl-config") / "tiny-sdxl", seed=0, family="sdxl")


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory):
    from finetune.models.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("sdxl-trained") / "tiny-sdxl", seed=1, family="sdxl")


@pytest.fixture(scope="module")
def parts(trained_folder):
    from finetune.models import family_for

    return family_for("sdxl").load(str(trained_folder))


@pytest.fixture(scope="module")
def checkpoint(parts, tmp_path_factory):
    return save_single_file_sdxl(tmp_path_factory.mktemp("sdxl-single") / "model.safetensors", parts,
                                 metadata={"note": "tiny"})


@pytest.fixture(scope="module")
def reloaded(checkpoint, config_folder):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_single_file(str(checkpoint), config=str(config_folder))


def test_from_single_file_rebuilds_every_weight_exactly(parts, reloaded, config_folder, checkpoint):
    from diffusers import UNet2DConditionModel

    for name in PARTS:
        expected, loaded = parts.modules[name].state_dict(), getattr(reloaded, name).state_dict()
        assert loaded.keys() == expected.keys(), name
        changed = [key for key in expected if not torch.equal(loaded[key], expected[key])]
        assert not changed, f"{name}: {changed[:5]}"
    folder_unet = UNet2DConditionModel.from_pretrained(config_folder, subfolder="unet").state_dict()
    assert not torch.equal(folder_unet["conv_in.weight"], reloaded.unet.state_dict()["conv_in.weight"]), \
        "the weights must come from the file, not from the config folder"
    assert read_metadata(checkpoint)["note"] == "tiny"


def test_diffusers_converters_consume_every_stored_key(parts, checkpoint):
    """Each stored tensor maps to exactly one parameter: nothing in the file is left over or ignored."""
    from diffusers.loaders import single_file_utils as convert

    stored = load_file(str(checkpoint))
    converted = {
        "unet": convert.convert_ldm_unet_checkpoint(stored, parts.unet.config),
        "vae": convert.convert_ldm_vae_checkpoint(stored, parts.vae.config),
        "text_encoder": {k.removeprefix("text_model."): v for k, v in convert.convert_ldm_clip_checkpoint(
            {k: v for k, v in stored.items() if k.startswith(CLIP_L_PREFIX)}).items()},
        "text_encoder_2": convert.convert_open_clip_checkpoint(parts.text_encoder_2, stored, prefix=CLIP_G_PREFIX),
    }
    layers = parts.text_encoder_2.config.num_hidden_layers
    for name in PARTS:
        expected = parts.modules[name].state_dict()
        assert converted[name].keys() == expected.keys(), name
        in_file = sum(key.startswith(PREFIXES[name]) for key in stored)
        # CLIP-G: q, k, v weights and biases are 2 fused tensors per layer instead of 6
        assert in_file == len(expected) - (4 * layers if name == "text_encoder_2" else 0), name
    assert len(stored) == sum(sum(key.startswith(prefix) for key in stored) for prefix in PREFIXES.values())


def test_same_image_from_the_same_seed(trained_folder, reloaded):
    from diffusers import StableDiffusionXLPipeline

    original = StableDiffusionXLPipeline.from_pretrained(str(trained_folder))
    expected = original(generator=torch.Generator().manual_seed(0), **IMAGE).images
    image = reloaded(generator=torch.Generator().manual_seed(0), **IMAGE).images
    assert expected.std() > 0
    # the weights are bit-equal (test above); the two pipelines' kernels may still sum in another order on some
    # CPUs (seen: 1e-7 apart), far below one level of an 8-bit pixel (3.9e-3)
    assert np.abs(image - expected).max() < 1e-5


def test_detected_as_sdxl(checkpoint):
    from finetune.models.detect import family_of

    assert family_of(str(checkpoint)) == "sdxl"


def test_from_single_file_works_offline(checkpoint, config_folder, tmp_path):
    """A fresh process with the hub off and an empty cache: everything comes from the file and the config folder."""
    script = ("import sys, torch\n"
              "from diffusers import StableDiffusionXLPipeline\n"
              "from safetensors.torch import load_file\n"
              "pipe = StableDiffusionXLPipeline.from_single_file(sys.argv[1], config=sys.argv[2])\n"
              "stored = load_file(sys.argv[1])\n"
              f"assert torch.equal(pipe.unet.conv_in.weight, stored['{UNET_PREFIX}input_blocks.0.0.weight'])\n"
              "print('loaded offline')\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-home")}
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run([sys.executable, "-c", script, str(checkpoint), str(config_folder)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded offline" in result.stdout


def test_wrapped_modules_and_half_precision(parts, tmp_path):
    class Wrapper(torch.nn.Module):  # what DDP / accelerate put around a trained module
        def __init__(self, module):
            super().__init__()
            self.module = module

    wrapped = parts.with_modules({"unet": Wrapper(parts.unet), "text_encoder_2": Wrapper(parts.text_encoder_2)})
    assert to_sgm_state_dict(wrapped).keys() == to_sgm_state_dict(parts).keys()
    stored = load_file(str(save_single_file_sdxl(tmp_path / "half.safetensors", wrapped, dtype=torch.float16)))
    assert {tensor.dtype for tensor in stored.values()} == {torch.float16}
    projection = parts.text_encoder_2.state_dict()["text_projection.weight"]
    assert torch.equal(stored[CLIP_G_PREFIX + "text_projection"], projection.T.half())


def test_open_clip_names_and_fused_attention(parts, checkpoint):
    stored = load_file(str(checkpoint))
    encoder = parts.text_encoder_2.state_dict()
    attention = "text_model.encoder.layers.1.self_attn."
    fused = torch.cat([encoder[attention + f"{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(stored[CLIP_G_PREFIX + "transformer.resblocks.1.attn.in_proj_weight"], fused)
    assert torch.equal(stored[CLIP_G_PREFIX + "positional_embedding"],
                       encoder["text_model.embeddings.position_embedding.weight"])
    for key in ("ln_final.weight", "token_embedding.weight", "transformer.resblocks.0.mlp.c_fc.bias",
                "transformer.resblocks.1.ln_2.weight", "transformer.resblocks.0.attn.out_proj.weight"):
        assert CLIP_G_PREFIX + key in stored, key
    assert torch.equal(stored[UNET_PREFIX + "label_emb.0.2.weight"],
                       parts.unet.state_dict()["add_embedding.linear_2.weight"])


def test_non_sdxl_parts_are_refused(parts, tmp_path):
    from finetune.models.tiny import build_tiny_pipeline
    from transformers import CLIPTextModel

    sd1_unet = build_tiny_pipeline().unet
    with pytest.raises(SingleFileExportError, match="addition_embed_type"):
        to_sgm_state_dict(parts.with_modules({"unet": sd1_unet}))
    no_projection = CLIPTextModel(parts.text_encoder_2.config)
    with pytest.raises(SingleFileExportError, match="without text_projection"):
        to_sgm_state_dict(parts.with_modules({"text_encoder_2": no_projection}))
    refiner_like = Components({k: v for k, v in parts.modules.items() if k != "text_encoder"}, {}, "unet",
                              ("text_encoder_2",), None, "refiner")
    path = tmp_path / "refiner.safetensors"
    with pytest.raises(SingleFileExportError, match="missing text_encoder"):
        save_single_file_sdxl(path, refiner_like)
    assert not path.exists()


def test_sdxl_base_shaped_models_get_the_released_key_names():
    """The released SDXL base's shapes on the meta device (no memory): diffusers detects it as SDXL base, and the
    counts and names match sd_xl_base_1.0.safetensors (2515 keys, less CLIP-L's position_ids and logit_scale)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as convert
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, cross_attention_dim=2048,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4)
        clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
            projection_dim=1280, hidden_act="gelu"))
    modules = {"unet": unet, "vae": vae, "text_encoder": clip_l, "text_encoder_2": clip_g}
    stored = to_sgm_state_dict(Components(modules, {}, "unet", ("text_encoder", "text_encoder_2"), None, "meta"))
    assert convert.infer_diffusers_model_type(stored) == "xl_base"
    counts = {name: sum(key.startswith(prefix) for key in stored) for name, prefix in PREFIXES.items()}
    assert counts == {"unet": 1680, "vae": 248, "text_encoder": 196, "text_encoder_2": 389}
    for key, shape in {UNET_PREFIX + "label_emb.0.0.weight": (1280, 2816),
                       UNET_PREFIX + "input_blocks.6.0.op.weight": (640, 640, 3, 3),
                       UNET_PREFIX + "input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
                       UNET_PREFIX + "middle_block.1.proj_in.weight": (1280, 1280),
                       UNET_PREFIX + "output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
                       UNET_PREFIX + "output_blocks.5.2.conv.weight": (640, 640, 3, 3),
                       CLIP_G_PREFIX + "transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
                       CLIP_G_PREFIX + "positional_embedding": (77, 1280),
                       CLIP_G_PREFIX + "text_projection": (1280, 1280),
                       CLIP_L_PREFIX + "encoder.layers.11.mlp.fc2.weight": (768, 3072)}.items():
        assert tuple(stored[key].shape) == shape, key
    converted = convert.convert_ldm_unet_checkpoint(stored, unet.config)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in unet.state_dict().items()}
    converted = convert.convert_open_clip_checkpoint(clip_g, stored, prefix=CLIP_G_PREFIX)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in clip_g.state_dict().items()}
