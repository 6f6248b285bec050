"""The Flux benchmark model (benchmarks/flux.py) has Flux.1-dev's shapes, and the step-time floor feeds a Flux
transformer what the flux family's predict feeds it. Nothing heavy runs: the full-size model is built on the meta
device, and the inputs are compared on the tiny Flux."""
from __future__ import annotations

import torch

from benchmarks.flux import BLOCKS, build_flux, floor_inputs, floor_loss
from finetune.models import family_for
from finetune.models.tiny import save_tiny_pipeline


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_build_flux_has_flux_dev_width_and_fewer_blocks():
    with torch.device("meta"):
        full, small = build_flux(blocks={}), build_flux()
    assert _count(full.transformer) == 11_901_408_320  # black-forest-labs/FLUX.1-dev's transformer
    config = small.transformer.config
    assert (config.num_layers, config.num_single_layers) == (BLOCKS["num_layers"], BLOCKS["num_single_layers"])
    assert config.num_attention_heads * config.attention_head_dim == 3072 and config.guidance_embeds
    # each block is a full-width one: the small model's blocks have the released blocks' parameters
    assert _count(small.transformer.transformer_blocks[0]) == _count(full.transformer.transformer_blocks[0])
    assert small.text_encoder_2.config.d_model == 4096 and small.text_encoder.config.hidden_size == 768
    assert small.vae.config.latent_channels == 16 and small.vae.config.force_upcast
    assert small.transformer.dtype == torch.bfloat16 and small.vae.dtype == torch.float32
    assert torch.get_default_dtype() == torch.float32


def test_the_floor_feeds_a_flux_transformer_as_the_flux_family_predicts(tmp_path):
    base = save_tiny_pipeline(tmp_path / "tiny-flux", family="flux")
    family = family_for("auto", str(base))
    parts = family.load(str(base))
    calls = []
    parts.transformer.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True)
    batch, side = 2, 8  # latents of a 64 px image (the tiny VAE downsamples by 4; the floor assumes Flux's 8)
    with torch.no_grad():
        family.predict(parts, torch.randn(batch, 4, side, side), torch.tensor([0.2, 0.7]),
                       family.encode_prompts(parts, ["a purple sks"] * batch), {})
        inputs = floor_inputs(parts.transformer.config, batch, side * 8, torch.Generator().manual_seed(0))
        floor_loss(parts.transformer, inputs, torch.Generator().manual_seed(0), torch.device("cpu"))
    ours, floor = calls
    assert ours.keys() == floor.keys()
    for key in ("hidden_states", "pooled_projections", "txt_ids", "img_ids", "guidance", "timestep"):
        assert ours[key].shape == floor[key].shape, key
    assert ours["encoder_hidden_states"].shape[:2] == floor["encoder_hidden_states"].shape[:2]  # 512 T5 tokens
    assert torch.equal(ours["img_ids"], floor["img_ids"]) and torch.equal(ours["txt_ids"], floor["txt_ids"])
    assert torch.equal(ours["guidance"], floor["guidance"])  # 1.0, the family's training default
