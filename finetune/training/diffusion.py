"""Noise, timesteps, regression target and loss weights, all taken from the base's noise scheduler."""
from __future__ import annotations

import torch


def noise_and_timesteps(scheduler, latents: torch.Tensor, generator: torch.Generator,
                        noise_offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    shape, device = latents.shape, latents.device
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    if noise_offset:
        # a per-channel constant shift lets the model learn very dark or bright images (Guttenberg 2023)
        noise = noise + noise_offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (shape[0],), generator=generator)
    return noise.to(device), timesteps.to(device)


def target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
           prediction_type: str) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction type {prediction_type!r}")


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas_cumprod / (1.0 - alphas_cumprod)


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), expressed for the target being regressed."""
    ratio = snr(scheduler, timesteps)
    clipped = torch.clamp(ratio, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (ratio + 1.0)
    return clipped / ratio


def per_sample_loss(prediction: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(prediction.float(), wanted.float(), reduction="none").mean(
        dim=list(range(1, prediction.ndim)))
