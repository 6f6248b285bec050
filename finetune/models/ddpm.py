"""The denoising-diffusion (DDPM) objective of the Stable Diffusion families: what a family's `objective` returns,
and all the training loop knows of noise, timesteps, targets and loss weights.

Latents are noised by the base's own scheduler, `add_noise(x0, noise, t) = sqrt(a_t) x0 + sqrt(1 - a_t) noise`
with `a_t = alphas_cumprod[t]`, at integer timesteps drawn uniformly from [0, num_train_timesteps); the target is
the noise (epsilon) or `sqrt(a_t) noise - sqrt(1 - a_t) x0` (v-prediction, Salimans & Ho 2022, the scheduler's
`get_velocity`); loss weights are Min-SNR-gamma's (Hang et al. 2023) when asked. Random draws come in a fixed order
(noise, the offset's shift, timesteps) on the generator's device (finetune/draws.py says what that changes across
devices), so runs repeat bit for bit on one device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

import torch

from finetune.recipe.keys import key


@dataclass
class DDPMOptions:
    """The DDPM objective's recipe keys, in the `model` section of a family that trains with it (sd, sdxl)."""
    reference_title: ClassVar[str] = "DDPM (noise prediction)"  # the recipe reference's heading for these keys
    prediction_type: Optional[Literal["epsilon", "v_prediction"]] = key(
        None, "What the denoiser predicts: `epsilon` (the noise) or `v_prediction`; null: what the base's scheduler "
              "says.")
    min_snr_gamma: Optional[float] = key(
        None, "Min-SNR-gamma loss weighting (Hang et al. 2023): the loss of timesteps whose signal-to-noise ratio is "
              "above gamma weighs less; null: plain MSE. 5.0 is usual.", above=0, hint="5.0 is usual")
    noise_offset: float = key(0.0, "A per-channel shift added to the noise, for very dark or very bright images "
                                   "(0.05 to 0.1 is usual); 0: none.", minimum=0, hint="0.05-0.1 is usual")

    def objective_problems(self) -> list[str]:
        """What the objective's keys get wrong together (each key's own bounds are declared on it)."""
        return []


@dataclass
class Noised:
    """One half of a batch made ready for the denoiser: its input, the timesteps it is told, and the target."""
    latents: torch.Tensor  # x0
    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor


@dataclass(frozen=True)
class DDPMObjective:
    scheduler: object  # diffusers' DDPMScheduler with the base's noise schedule
    prediction_type: str  # "epsilon" or "v_prediction"
    noise_offset: float = 0.0  # a per-channel constant shift (Guttenberg 2023): very dark or bright images
    min_snr_gamma: float | None = None

    def noise(self, latents: torch.Tensor, generator: torch.Generator) -> Noised:
        """Draw noise and timesteps for `latents` [batch, channels, h, w] from `generator`, on the generator's
        device (the run's: no copy from the host, finetune/draws.py), and noise them."""
        shape, device, drawn_on = latents.shape, latents.device, generator.device
        noise = torch.randn(shape, generator=generator, dtype=torch.float32, device=drawn_on)
        if self.noise_offset:
            noise = noise + self.noise_offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator,
                                                            device=drawn_on)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (shape[0],), generator=generator,
                                  device=drawn_on)
        # nothing to copy when the generator is on the latents' device, as the loop's is
        noise, timesteps = noise.to(device), timesteps.to(device)
        return self.noised(latents, noise, timesteps)

    def noised(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> Noised:
        """`latents` noised with the given `noise` (their shape) at `timesteps` [batch], all on one device."""
        return Noised(latents, self.scheduler.add_noise(latents, noise, timesteps), timesteps,
                      self.target(latents, noise, timesteps))

    def fixed_points(self, count: int, height: int, width: int) -> torch.Tensor:
        """`count` timesteps [count] (long, on the CPU) spread over the schedule as `noise` draws them: the
        quantiles (k + 1/2) / count of its uniform draw over [0, num_train_timesteps), so a validation score is a
        stratified estimate of what the training loss averages. The latent size does not matter here."""
        total = self.scheduler.config.num_train_timesteps
        return ((torch.arange(count, dtype=torch.float64) + 0.5) * total / count).long()

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, timesteps)
        raise ValueError(f"unsupported prediction type {self.prediction_type!r}")

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        alphas_cumprod = self.scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
        return alphas_cumprod / (1.0 - alphas_cumprod)

    def weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """Per-sample loss weights, or None for plain MSE: Min-SNR-gamma, min(SNR, gamma) / SNR for epsilon
        and min(SNR, gamma) / (SNR + 1) for v-prediction."""
        if self.min_snr_gamma is None:
            return None
        ratio = self.snr(timesteps)
        clipped = torch.clamp(ratio, max=self.min_snr_gamma)
        return clipped / (ratio + 1.0) if self.prediction_type == "v_prediction" else clipped / ratio
