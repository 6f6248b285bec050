"""The step-time floor's side of benchmarks/step_time.py: the denoiser and one step's loss as a hand-written script
computes them, on inputs drawn once. A U-Net (sd, sdxl) with its DDPM loss, or Flux's transformer with the flow-matching
loss (benchmarks/flux.py)."""
from __future__ import annotations

import json
from pathlib import Path


def floor_conditioning(unet_config, text_config: dict, batch: int, resolution: int, generator):
    """What the U-Net is conditioned on, drawn once: hidden states [batch, tokens, cross_attention_dim], and for
    SDXL (`addition_embed_type: text_time`) the `added_cond_kwargs` its family's predict passes: the pooled text
    embedding [batch, 1280] and each sample's six size numbers (original size, crop corner, target size), here
    those of a square image trained whole. Returns (states, added or None), in fp32 on the CPU."""
    import torch

    states = torch.randn(batch, text_config["max_position_embeddings"], unet_config.cross_attention_dim,
                         generator=generator)
    if unet_config.addition_embed_type != "text_time":
        return states, None
    sizes = 6  # time_ids: (h, w) + (top, left) + (h, w), each number embedded addition_time_embed_dim wide
    pooled = unet_config.projection_class_embeddings_input_dim - sizes * unet_config.addition_time_embed_dim
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32)
    return states, {"text_embeds": torch.randn(batch, pooled, generator=generator),
                    "time_ids": time_ids.repeat(batch, 1)}


def unet_floor(recipe, device, generator):
    """A U-Net and its DDPM loss: epsilon MSE at a uniform timestep."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from finetune.training.run import weight_dtype

    t, d, base = recipe.train, recipe.data, recipe.model.base
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet",
                                                dtype=weight_dtype(recipe.model.dtype, t.mixed_precision))
    scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    text = json.loads((Path(base) / "text_encoder" / "config.json").read_text())
    vae = json.loads((Path(base) / "vae" / "config.json").read_text())
    side = d.resolution // 2 ** (len(vae["block_out_channels"]) - 1)
    latents = torch.randn(t.batch_size, unet.config.in_channels, side, side, generator=generator).to(device)
    states, added = floor_conditioning(unet.config, text, t.batch_size, d.resolution, generator)
    states = states.to(device)
    extra = {} if added is None else {
        "added_cond_kwargs": {key: value.to(device, unet.dtype) for key, value in added.items()}}

    def loss_of():
        noise = torch.randn(latents.shape, generator=generator).to(device)
        steps = torch.randint(0, scheduler.config.num_train_timesteps, (t.batch_size,), generator=generator)
        noisy = scheduler.add_noise(latents, noise, steps).to(device)
        prediction = unet(noisy.to(unet.dtype), steps.to(device), states.to(unet.dtype), **extra).sample
        return torch.nn.functional.mse_loss(prediction.float(), noise)
    return unet, loss_of


def transformer_floor(recipe, device, generator):
    """Flux's transformer and its flow-matching loss (benchmarks/flux.py), on cached-text stand-ins."""
    from diffusers import FluxTransformer2DModel

    from benchmarks import flux
    from finetune.training.run import weight_dtype

    t = recipe.train
    transformer = FluxTransformer2DModel.from_pretrained(recipe.model.base, subfolder="transformer",
                                                         dtype=weight_dtype(recipe.model.dtype, t.mixed_precision))
    inputs = flux.floor_inputs(transformer.config, t.batch_size, recipe.data.resolution, generator)
    return transformer, lambda: flux.floor_loss(transformer, inputs, generator, device)
