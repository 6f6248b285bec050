"""One micro-step's loss: encode, noise, predict, regress, weight; with the prior-preservation half when asked.

Random draws happen in a fixed order from the step's generator (instance latents, instance noise, then the
class half), so the instance half of a step is the same with or without prior preservation; with
`loss_weight: 0` the run therefore follows the one without it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from finetune.models.base import Components, ModelFamily
from finetune.training import diffusion
from finetune.training.caches import BatchEncoder


@dataclass(frozen=True)
class LossSettings:
    prediction_type: str
    noise_offset: float
    min_snr_gamma: float | None
    text_encoder_trains: bool
    prior_mode: str = "none"  # "none", "class_images" or "base_prediction"
    prior_weight: float = 1.0
    class_prompts: tuple[str, ...] = ()


@dataclass
class Noised:
    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    noisy: torch.Tensor


def _noise(scheduler, latents: torch.Tensor, generator: torch.Generator, noise_offset: float) -> Noised:
    noise, timesteps = diffusion.noise_and_timesteps(scheduler, latents, generator, noise_offset)
    return Noised(latents, noise, timesteps, scheduler.add_noise(latents, noise, timesteps))


def micro_step_loss(family: ModelFamily, parts: Components, strategy, batch: dict[str, Any],
                    class_batch: dict[str, Any] | None, generator: torch.Generator,
                    settings: LossSettings, encoder: BatchEncoder) -> torch.Tensor:
    scheduler = parts.noise_scheduler
    instance = _noise(scheduler, encoder.latents(parts, batch, generator), generator, settings.noise_offset)
    captions = strategy.prompts(list(batch["captions"]), generator)
    halves = [instance]
    frozen_target = None
    if settings.prior_mode == "class_images":
        latents = encoder.latents(parts, class_batch, generator)
        halves.append(_noise(scheduler, latents, generator, settings.noise_offset))
        captions += list(class_batch["captions"])
    elif settings.prior_mode == "base_prediction":
        # the instances' own latents, noised afresh and captioned with class prompts: what the frozen base
        # predicts for them is the target, so no class images are needed
        cls = _noise(scheduler, instance.latents, generator, settings.noise_offset)
        picks = torch.randint(len(settings.class_prompts), (len(captions),), generator=generator).tolist()
        class_captions = [settings.class_prompts[i] for i in picks]
        with torch.no_grad(), strategy.frozen_base(parts) as base:
            conditioning = encoder.conditioning(base, class_captions, text_encoder_trains=False)
            frozen_target = family.predict(base, cls.noisy, cls.timesteps, conditioning).float()
        halves.append(cls)
        captions += class_captions

    with torch.set_grad_enabled(settings.text_encoder_trains):
        conditioning = encoder.conditioning(parts, captions, settings.text_encoder_trains)
    noisy = torch.cat([h.noisy for h in halves])
    timesteps = torch.cat([h.timesteps for h in halves])
    prediction = family.predict(parts, noisy, timesteps, conditioning)
    wanted = [diffusion.target(scheduler, h.latents, h.noise, h.timesteps, settings.prediction_type)
              for h in halves]
    if frozen_target is not None:
        wanted[1] = frozen_target
    per_sample = diffusion.per_sample_loss(prediction, torch.cat(wanted))
    if settings.min_snr_gamma is not None:
        per_sample = per_sample * diffusion.min_snr_weights(scheduler, timesteps, settings.min_snr_gamma,
                                                            settings.prediction_type)
    n = len(instance.latents)
    loss = strategy.loss(per_sample[:n], batch)
    if len(halves) == 2:
        loss = loss + settings.prior_weight * strategy.loss(per_sample[n:], class_batch or batch)
    return loss
