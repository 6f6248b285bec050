"""One micro-step's loss: draw (the family's objective noises latents and names the target), predict, weighted
MSE; with the prior-preservation half when asked. Nothing here knows which objective or family runs.

Random draws happen in a fixed order from the step's generators (instance latents, instance noise, then the
class half), so the instance half of a step is the same with or without prior preservation; with
`loss_weight: 0` the run therefore follows the one without it. Tensors are drawn on the run's device, choices
Python acts on (prompts) from a CPU generator (finetune/draws.py): nothing here reads a device tensor back, so a
step never waits for the device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from finetune.data.masks import latent_weights
from finetune.draws import StepDraws, host_choices
from finetune.models.base import Components, ModelFamily
from finetune.training.inputs import BatchEncoder


@dataclass(frozen=True)
class LossSettings:
    objective: Any  # the family's objective (finetune/models/ddpm.py): noise(latents, generator), weights(t)
    text_encoder_trains: bool
    prior_mode: str = "none"  # "none", "class_images" or "base_prediction"
    prior_weight: float = 1.0
    class_prompts: tuple[str, ...] = ()
    unmasked_weight: float = 0.0  # data.unmasked_weight: the loss weight where a mask is black (data/masks.py)


def per_sample_loss(prediction: torch.Tensor, wanted: torch.Tensor,
                    weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per sample (over every dimension but the batch's), in fp32. `weights`: per-element
    weights broadcast against the error (masks: [batch, 1, h, w]); the mean of the product, not divided by the
    weights' sum (data/masks.py says why)."""
    error = torch.nn.functional.mse_loss(prediction.float(), wanted.float(), reduction="none")
    if weights is not None:
        error = error * weights.to(error.device, torch.float32)
    return error.mean(dim=list(range(1, prediction.ndim)))


def micro_step_loss(family: ModelFamily, parts: Components, strategy, batch: dict[str, Any],
                    class_batch: dict[str, Any] | None, draws: StepDraws,
                    settings: LossSettings, encoder: BatchEncoder) -> torch.Tensor:
    """The micro-step's loss, a 0-d tensor on the run's device (not read here: the loop reads it at log points).
    `draws`: the micro-step's generators (finetune/draws.py)."""
    objective, generator = settings.objective, draws.tensors
    instance = objective.noise(encoder.latents(parts, batch, generator), generator)
    controls = encoder.control_latents(parts, batch)  # data.control's, one per slot; nothing drawn (the VAE's mode)
    captions = strategy.prompts(list(batch["captions"]), draws.host)
    halves = [instance]
    frozen_target = None
    if settings.prior_mode == "class_images":
        latents = encoder.latents(parts, class_batch, generator)
        halves.append(objective.noise(latents, generator))
        captions += list(class_batch["captions"])
    elif settings.prior_mode == "base_prediction":
        # the instances' own latents, noised afresh and captioned with class prompts: what the frozen base
        # predicts for them is the target, so no class images are needed
        cls = objective.noise(instance.latents, generator)
        class_captions = host_choices(len(captions), settings.class_prompts, draws.host)
        with torch.no_grad(), strategy.frozen_base(parts) as base:
            conditioning = encoder.conditioning(base, class_captions, text_encoder_trains=False)
            frozen_target = family.predict(base, cls.noisy, cls.timesteps, conditioning,
                                           _with_controls(_on(batch["conditions"], cls.noisy.device), controls, 1)
                                           ).float()
        halves.append(cls)
        captions += class_captions

    with torch.set_grad_enabled(settings.text_encoder_trains):
        conditioning = encoder.conditioning(parts, captions, settings.text_encoder_trains)
    noisy = torch.cat([h.noisy for h in halves])
    timesteps = torch.cat([h.timesteps for h in halves])
    # what each image tells the model besides its pixels (SDXL's sizes and crop corners), for both halves
    image_conditions = [batch["conditions"]] + [(class_batch or batch)["conditions"]] * (len(halves) - 1)
    conditions = {key: torch.cat([c[key] for c in image_conditions]) for key in batch["conditions"]}
    prediction = family.predict(parts, noisy, timesteps, conditioning,
                                _with_controls(_on(conditions, noisy.device), controls, len(halves)))
    wanted = [h.target for h in halves]
    if frozen_target is not None:
        wanted[1] = frozen_target
    per_sample = per_sample_loss(prediction, torch.cat(wanted), _mask_weights(encoder.masks(batch), prediction,
                                                                             len(halves), settings.unmasked_weight))
    weights = objective.weights(timesteps)
    if weights is not None:
        per_sample = per_sample * weights
    n = len(instance.latents)
    loss = per_sample[:n].mean()
    if len(halves) == 2:
        loss = loss + settings.prior_weight * per_sample[n:].mean()
    return loss


def _mask_weights(masks: torch.Tensor | None, prediction: torch.Tensor, halves: int,
                  unmasked_weight: float) -> torch.Tensor | None:
    """Loss weights [2B or B, 1, h, w] from the instance images' masks at the prediction's (unpacked) latent size;
    the prior-preservation half is not masked (weight 1). None without masks: the plain loss, bit for bit."""
    if masks is None:
        return None
    weights = latent_weights(masks, prediction.shape[-2:], unmasked_weight)
    return torch.cat([weights] + [torch.ones_like(weights)] * (halves - 1))


def _with_controls(conditions: dict[str, Any], controls: list[torch.Tensor], halves: int) -> dict[str, Any]:
    """`conditions` with `control_latents` (finetune/models/family.py: predict), each slot repeated along the batch
    for every half: the class half of prior preservation (base_prediction) edits the same control images. Unchanged
    without control images."""
    if not controls:
        return conditions
    return conditions | {"control_latents": [torch.cat([latents] * halves) for latents in controls]}


def _on(conditions: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    # already there when the loop moved the batch ahead of the step (training/inputs.py: ahead_on_device)
    return {key: value.to(device, non_blocking=True) for key, value in conditions.items()}
