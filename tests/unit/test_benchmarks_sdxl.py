"""The SDXL benchmark model (benchmarks/models.py `build_sdxl`) has the released SDXL 1.0 base's shapes, and the
step-time floor conditions an SDXL U-Net as the SDXL family's predict does. Nothing heavy runs: the full-size
model is built on the meta device, and the conditioning is compared on the tiny SDXL."""
from __future__ import annotations

import json

import torch

from benchmarks.models import build_sdxl
from benchmarks.step_time import floor_conditioning
from finetune.models import family_for
from finetune.models.tiny import save_tiny_pipeline


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_build_sdxl_has_the_released_sdxl_base_shapes():
    with torch.device("meta"):
        pipe = build_sdxl(dtype=torch.bfloat16)
    # the parameter counts of stabilityai/stable-diffusion-xl-base-1.0's parts
    assert _count(pipe.unet) == 2_567_463_684
    assert _count(pipe.text_encoder) == 123_060_480  # CLIP ViT-L/14
    assert _count(pipe.text_encoder_2) == 694_659_840  # OpenCLIP ViT-bigG/14 with its projection
    assert _count(pipe.vae) == 83_653_863
    assert pipe.text_encoder_2.config.projection_dim == 1280
    assert pipe.unet.dtype == pipe.text_encoder_2.dtype == torch.bfloat16
    assert pipe.vae.dtype == torch.float32 and pipe.vae.config.force_upcast
    assert pipe.vae.config.scaling_factor == 0.13025
    assert pipe.tokenizer.model_max_length == pipe.tokenizer_2.model_max_length == 77
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token != "!"
    assert torch.get_default_dtype() == torch.float32  # building in bf16 leaves the default as it was
    states, added = floor_conditioning(pipe.unet.config, pipe.text_encoder.config.to_dict(), 2, 512,
                                       torch.Generator().manual_seed(0))
    assert states.shape == (2, 77, 2048)
    assert added["text_embeds"].shape == (2, 1280) and added["time_ids"].shape == (2, 6)


def test_the_floor_conditions_an_sdxl_unet_as_the_sdxl_family_predicts(tmp_path):
    base = save_tiny_pipeline(tmp_path / "tiny-sdxl", family="sdxl")
    family = family_for("auto", str(base))
    parts = family.load(str(base))
    calls = []
    parts.unet.register_forward_pre_hook(lambda module, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
    side, batch = 32, 2
    conditions = {"original_sizes": torch.tensor([[side, side]] * batch),
                  "crop_top_lefts": torch.tensor([[0, 0]] * batch),
                  "target_sizes": torch.tensor([[side, side]] * batch)}
    with torch.no_grad():
        family.predict(parts, torch.randn(batch, 4, 8, 8), torch.tensor([10, 500]),
                       family.encode_prompts(parts, ["a purple sks"] * batch), conditions)
    (args, kwargs), = calls
    text = json.loads((base / "text_encoder" / "config.json").read_text())  # what the floor reads
    states, added = floor_conditioning(parts.unet.config, text, batch, side, torch.Generator().manual_seed(0))
    assert states.shape == args[2].shape
    wanted = kwargs["added_cond_kwargs"]
    assert added.keys() == wanted.keys()
    assert {k: v.shape for k, v in added.items()} == {k: v.shape for k, v in wanted.items()}
    assert torch.equal(added["time_ids"], wanted["time_ids"])  # a square image trained whole


def test_the_floor_gives_an_sd_unet_its_hidden_states_alone(tiny_base):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet")
    text = json.loads((tiny_base / "text_encoder" / "config.json").read_text())
    states, added = floor_conditioning(unet.config, text, 1, 32, torch.Generator().manual_seed(0))
    assert added is None and states.shape == (1, text["max_position_embeddings"], unet.config.cross_attention_dim)
