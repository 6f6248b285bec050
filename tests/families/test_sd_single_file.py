"""Single-file export: an original-layout (A1111/ComfyUI) checkpoint that diffusers loads back bit-identically."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from finetune.export.single_file import (
    SingleFileExportError, TEXT_ENCODER_PREFIX, UNET_PREFIX, VAE_PREFIX, save_single_file, to_original_state_dict)
from finetune.io.safetensors_io import read_metadata
from finetune.models.stable_diffusion import StableDiffusion

COMPONENT_PREFIXES = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": "cond_stage_model."}


@pytest.fixture(scope="module")
def trained():
    """Weights other than the config folder's (seed 1 vs 0), so a loader that read the folder's weights would fail."""
    from finetune.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline(seed=1)


@pytest.fixture(scope="module")
def checkpoint(trained, tmp_path_factory):
    path = tmp_path_factory.mktemp("single") / "model.safetensors"
    return save_single_file(path, trained.unet, trained.vae, trained.text_encoder, metadata={"note": "tiny"})


def test_our_loader_gets_every_parameter_back_bit_identical(trained, checkpoint, tiny_base):
    parts = StableDiffusion().load(str(checkpoint), config=str(tiny_base))
    stored = load_file(str(checkpoint))
    for name, prefix in COMPONENT_PREFIXES.items():
        expected, loaded = getattr(trained, name).state_dict(), getattr(parts, name).state_dict()
        assert loaded.keys() == expected.keys(), name
        changed = [key for key in expected if not torch.equal(loaded[key], expected[key])]
        assert not changed, f"{name}: {changed[:5]}"
        # one stored tensor per parameter: nothing in the file went unused
        assert sum(key.startswith(prefix) for key in stored) == len(expected), name
    assert len(stored) == sum(len(getattr(trained, name).state_dict()) for name in COMPONENT_PREFIXES)
    assert read_metadata(checkpoint)["note"] == "tiny"


def test_vae_attention_is_stored_as_1x1_convolutions(trained, checkpoint):
    stored = load_file(str(checkpoint))
    query = trained.vae.state_dict()["decoder.mid_block.attentions.0.to_q.weight"]
    assert torch.equal(stored[VAE_PREFIX + "decoder.mid.attn_1.q.weight"], query[:, :, None, None])
    assert TEXT_ENCODER_PREFIX + "embeddings.token_embedding.weight" in stored


def test_diffusers_converters_consume_every_key(trained, checkpoint):
    """diffusers' own original->diffusers functions (what from_single_file uses) map each stored key once."""
    from diffusers.loaders import single_file_utils as convert

    stored = load_file(str(checkpoint))
    unet = convert.convert_ldm_unet_checkpoint(stored, trained.unet.config)
    vae = convert.convert_ldm_vae_checkpoint(stored, trained.vae.config)
    clip = {k.removeprefix("text_model."): v for k, v in convert.convert_ldm_clip_checkpoint(stored).items()}
    for name, converted in (("unet", unet), ("vae", vae), ("text_encoder", clip)):
        assert converted.keys() == getattr(trained, name).state_dict().keys(), name
        assert len(converted) == sum(key.startswith(COMPONENT_PREFIXES[name]) for key in stored), name


def test_half_precision_export(trained, tmp_path):
    path = save_single_file(tmp_path / "half.safetensors", trained.unet, trained.vae, trained.text_encoder,
                            dtype=torch.float16)
    stored = load_file(str(path))
    assert {tensor.dtype for tensor in stored.values()} == {torch.float16}
    conv_in = trained.unet.state_dict()["conv_in.weight"]
    assert torch.equal(stored[UNET_PREFIX + "input_blocks.0.0.weight"], conv_in.half())


def test_sd2_openclip_text_encoder_is_refused(trained, tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    openclip_like = CLIPTextModel(CLIPTextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=16, hidden_act="gelu"))
    path = tmp_path / "sd2.safetensors"
    with pytest.raises(ValueError, match="only SD1-style CLIP text encoders"):
        save_single_file(path, trained.unet, trained.vae, openclip_like)
    assert not path.exists()


def test_parameter_without_an_original_place_is_refused(trained):
    from diffusers import UNet2DConditionModel

    lcm_like = UNet2DConditionModel.from_config(trained.unet.config, time_cond_proj_dim=8)
    with pytest.raises(SingleFileExportError, match=r"no place in the SD1 original layout.*time_embedding\.cond_proj"):
        to_original_state_dict(lcm_like, trained.vae, trained.text_encoder)


def test_sd15_shaped_models_get_the_well_known_key_names():
    """Real SD1.5 shapes on the meta device (no memory): the counts and names every SD1.5 checkpoint has."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as convert
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4)
        text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12))
    stored = to_original_state_dict(unet, vae, text_encoder)
    assert convert.infer_diffusers_model_type(stored) == "v1"
    assert sum(key.startswith(UNET_PREFIX) for key in stored) == 686
    assert sum(key.startswith(VAE_PREFIX) for key in stored) == 248
    for key, shape in {"output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
                       "input_blocks.9.0.op.weight": (1280, 1280, 3, 3),
                       "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
                       "output_blocks.8.2.conv.weight": (640, 640, 3, 3),
                       "middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768)}.items():
        assert tuple(stored[UNET_PREFIX + key].shape) == shape, key
    assert tuple(stored[VAE_PREFIX + "decoder.up.3.upsample.conv.weight"].shape) == (512, 512, 3, 3)
    converted = convert.convert_ldm_unet_checkpoint(stored, unet.config)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in unet.state_dict().items()}
