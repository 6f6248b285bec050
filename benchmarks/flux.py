"""The Flux.1-dev architecture for the benchmarks: its transformer at full width (3072 = 24 heads x 128, T5 width
4096, CLIP pooled 768, guidance embedding) with fewer blocks, random weights; and the step-time floor for it.

Configs: benchmarks/configs/flux/, the values of black-forest-labs/FLUX.1-dev's published config.json files
(transformer, vae, text_encoder = CLIP ViT-L/14, text_encoder_2 = T5 v1.1 XXL encoder, scheduler). The full
transformer has 19 double- and 38 single-stream blocks (11,901,408,320 parameters); the benchmark keeps
`BLOCKS` of each, which is what two processes side by side fit on a 24 GB, 2-core machine at a few seconds a
step. The VAE is the released one's shape. The text encoders are stand-ins of one layer with the real output
widths (T5 states 4096 wide, CLIP-L pooled 768): training runs on their cached outputs and their weights leave
before the first step, as in the recipes, so only the widths reach the step.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

CONFIGS = Path(__file__).parent / "configs" / "flux"
BLOCKS = {"num_layers": 1, "num_single_layers": 1}  # double- and single-stream blocks the benchmark keeps


def config(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


def build_flux(seed: int = 0, dtype: torch.dtype = torch.bfloat16, blocks: dict | None = None):
    """A FluxPipeline with Flux.1-dev's transformer width and VAE, `blocks` (default BLOCKS; {} for all 19 + 38)
    and one-layer text encoders of the real widths; the transformer in `dtype`, the VAE fp32 (`force_upcast`)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from finetune.models.tiny_clip import build_tokenizer
    from finetune.models.tiny_transformers import build_t5_tokenizer

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = build_tokenizer(max_length=77), build_t5_tokenizer()
    clip = CLIPTextConfig(**{**config("text_encoder"), "num_hidden_layers": 1, "vocab_size": len(tokenizer)},
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    t5 = T5Config(**{**config("text_encoder_2"), "num_layers": 1, "num_heads": 2, "d_ff": 256,
                     "vocab_size": len(tokenizer_2)}, decoder_start_token_id=0, dropout_rate=0.0)
    vae = AutoencoderKL(**config("vae"))
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in `dtype` at once: no full-precision copy on the way
    try:
        text_encoder, text_encoder_2 = CLIPTextModel(clip), T5EncoderModel(t5)
        transformer = FluxTransformer2DModel(**{**config("transformer"), **(BLOCKS if blocks is None else blocks)})
    finally:
        torch.set_default_dtype(default)
    with torch.device("cpu"):  # the schedule's tables, also when the networks are built on the meta device
        scheduler = FlowMatchEulerDiscreteScheduler(**config("scheduler"))
    return FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)


def floor_inputs(transformer_config, batch: int, resolution: int, generator, t5_tokens: int = 512) -> dict:
    """What a hand-written Flux LoRA script feeds the transformer, drawn or built once, fp32 on the CPU: latents
    [batch, 16, side, side] (VAE downsampling 8), cached-text stand-ins (T5 states [batch, t5_tokens, 4096] at
    FluxPipeline's default max_sequence_length 512, CLIP-L pooled [batch, 768]), the position ids FluxPipeline
    builds and dev's guidance (1.0, the family's training default)."""
    from diffusers import FluxPipeline

    side = resolution // 8
    channels = transformer_config.in_channels // 4  # 2x2 patches packed into each token
    inputs = {"latents": torch.randn(batch, channels, side, side, generator=generator),
              "encoder_hidden_states": torch.randn(batch, t5_tokens, transformer_config.joint_attention_dim,
                                                   generator=generator),
              "pooled_projections": torch.randn(batch, transformer_config.pooled_projection_dim, generator=generator),
              "txt_ids": torch.zeros(t5_tokens, 3),
              "img_ids": FluxPipeline._prepare_latent_image_ids(batch, side // 2, side // 2, "cpu", torch.float32)}
    if transformer_config.guidance_embeds:
        inputs["guidance"] = torch.ones(batch)
    return inputs


def floor_loss(transformer, inputs: dict, generator, device) -> torch.Tensor:
    """One flow-matching loss as a minimal script computes it (diffusers' train_dreambooth_lora_flux.py): sigma
    uniform, noisy = (1 - sigma) x0 + sigma noise, target noise - x0, MSE over the unpacked prediction."""
    from diffusers import FluxPipeline

    latents = inputs["latents"]
    batch, channels, height, width = latents.shape
    noise = torch.randn(latents.shape, generator=generator)
    sigma = torch.rand(batch, generator=generator)
    s = sigma.view(-1, 1, 1, 1)
    noisy = ((1 - s) * latents + s * noise).to(device)
    dtype = transformer.dtype
    packed = FluxPipeline._pack_latents(noisy.to(dtype), batch, channels, height, width)
    kwargs = {k: v.to(device, dtype) for k, v in inputs.items() if k not in ("latents", "guidance")}
    guidance = inputs.get("guidance")
    tokens = transformer(hidden_states=packed, timestep=sigma.to(device, dtype), return_dict=False,
                         guidance=None if guidance is None else guidance.to(device), **kwargs)[0]
    prediction = FluxPipeline._unpack_latents(tokens, height, width, 1)
    return torch.nn.functional.mse_loss(prediction.float(), (noise - latents).to(device))
