"""A validation score per run (recipe section `validation`): the loss on held-out images at fixed noise and fixed
timesteps (or sigmas), the same at every step and in every run of the same recipe and data, so that it can say when
training stops helping.

How the score is made (all fixed at setup, before the first step):
- images: `validation.images`, a folder read like data.images, or a fraction of the training images held out
  (data/prepare.py: split_held_out; those are never trained on, and keep their control images with data.control;
  a folder with data.control is refused by the recipe checks, its images having no control images). Each is resized to data.resolution squared and
  centre-cropped, unflipped, and encoded to its latent's mean (no draw: the VAE's mode), captions as the strategy
  makes them (textual inversion's templates drawn from the validation seed);
- timesteps: `validation.timesteps` points at the quantiles (k + 1/2) / K of the objective's own density
  (objective.fixed_points in models/ddpm.py and flow_matching.py): the score is then a stratified estimate of the
  quantity the training loss averages, so both curves share a scale on the report. Evenly spaced sigmas would give
  the ends of the schedule, which flow-matching training rarely draws, as much weight as its middle;
- noise: drawn once per image from a CPU generator seeded with `validation.seed`: never the training generators, so
  a run's training draws and losses are the same with or without validation, and the score's noise is the same on
  any device.
The score, each image's per-timestep MSE weighted as the objective weights the training loss (Min-SNR, ...) and, for
a held-out training image with a mask (data.masks), per pixel by its mask as training weighs it; averaged, is computed in no_grad with every module in eval mode (no dropout), inside the weights the run shows
(training/shown_weights.py: EMA's average where on), every `validation.every` steps and at the last step.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from finetune.data.control_sizes import control_sizes
from finetune.data.dataset import ImageCaptionDataset, collate
from finetune.data.masks import latent_weights
from finetune.data.prepare import held_out_fraction
from finetune.data.sources import Example, list_examples
from finetune.recipe.schema import DataOptions, ValidationOptions
from finetune.training.step import per_sample_loss


def folder_examples(options: ValidationOptions, d: DataOptions) -> list[Example]:
    """The images and captions of a `validation.images` folder, read as data.images is read (caption files,
    metadata.jsonl, data.prompt); raises DataError as data.images would."""
    return list_examples(os.path.expanduser(options.images), None, prompt=d.prompt,
                         caption_extension=d.caption_extension, split=d.split, image_column=d.image_column,
                         caption_column=d.caption_column, on_bad_image="error")


@dataclass
class HeldOutImage:
    latents: torch.Tensor  # [1, c, h, w] on the run's device: the VAE's mean, normalised for the denoiser
    noise: torch.Tensor  # [K, c, h, w] on the run's device, drawn from the validation seed
    points: torch.Tensor  # [K] timesteps or sigmas on the run's device (objective.fixed_points)
    caption: str
    conditions: dict[str, torch.Tensor]  # [1, 2] each (SDXL's sizes and crop corner)
    mask: torch.Tensor | None = None  # [1, 1, H, W] in [0, 1] on the run's device: data.masks' mask of the image
    # data.control's control latents of the image, one [1, c, h_i, w_i] per slot on the run's device
    controls: list[torch.Tensor] = field(default_factory=list)


class ValidationScore:
    """The held-out images made ready, and how often to score them. `score` returns a 0-d tensor on the device."""

    def __init__(self, images: list[HeldOutImage], every: int, max_steps: int, chunk: int, source: str,
                 unmasked_weight: float = 0.0):
        self.images, self.every, self.max_steps, self.chunk, self.source = images, every, max_steps, chunk, source
        self.unmasked_weight = unmasked_weight  # data.unmasked_weight, for held-out images that carry a mask

    def due(self, step: int) -> bool:
        """Whether step `step` (steps done) is scored: every `every` steps and the last."""
        return step == self.max_steps or (self.every > 0 and step % self.every == 0)

    @property
    def summary(self) -> str:
        points = len(self.images[0].points) if self.images else 0
        when = f"every {self.every} steps and at the last" if self.every else "at the last step"
        return (f"validation: {len(self.images)} held-out image(s) ({self.source}), each at {points} fixed "
                f"timesteps with fixed noise, scored {when}")

    def score(self, family, parts, objective, encoder, text_encoder_trains: bool) -> torch.Tensor:
        """Mean weighted MSE over the held-out images and fixed timesteps (a 0-d fp32 tensor on the device, not
        read here). Uses the modules as they are now: call it inside shown_weights."""
        total = None
        with torch.no_grad(), _eval_mode(parts.modules.values()):
            for image in self.images:
                for start in range(0, len(image.points), self.chunk):
                    points = image.points[start:start + self.chunk]
                    count = len(points)
                    noised = objective.noised(image.latents.expand(count, -1, -1, -1),
                                              image.noise[start:start + count], points)
                    conditioning = encoder.conditioning(parts, [image.caption] * count, text_encoder_trains)
                    conditions = {key: value.expand(count, -1) for key, value in image.conditions.items()}
                    if image.controls:
                        conditions["control_latents"] = [c.expand(count, -1, -1, -1) for c in image.controls]
                    prediction = family.predict(parts, noised.noisy, noised.timesteps, conditioning, conditions)
                    if image.mask is None:
                        per_sample = torch.nn.functional.mse_loss(prediction.float(), noised.target.float(),
                                                                  reduction="none").flatten(1).mean(1)
                    else:  # weighted by its mask as training weighs it, so both curves measure the same thing
                        weights = latent_weights(image.mask, prediction.shape[-2:], self.unmasked_weight)
                        per_sample = per_sample_loss(prediction, noised.target, weights)
                    weights = objective.weights(points)
                    if weights is not None:
                        per_sample = per_sample * weights
                    total = per_sample.sum() if total is None else total + per_sample.sum()
        return total / sum(len(image.points) for image in self.images)


def prepare_validation(options: ValidationOptions, d: DataOptions, held_out: list[Example], family, parts,
                       objective, encoder, strategy, device: torch.device, chunk: int,
                       max_steps: int) -> ValidationScore | None:
    """The held-out images encoded and their noise drawn (None when `validation.images` is unset). `held_out`:
    the training images setup held out for a fraction; `chunk`: timesteps per forward (train.batch_size).
    Caches the captions' text conditioning where the text cache is on; call it while the VAE and text encoders can
    run (before the caches' owners leave the device)."""
    if options.images is None:
        return None
    fraction = held_out_fraction(options.images)
    examples = held_out if fraction is not None else folder_examples(options, d)
    source = (f"{fraction:g} of the training images, not trained on" if fraction is not None
              else str(Path(os.path.expanduser(options.images))))
    sizes = [(d.resolution, d.resolution)] * len(examples)
    items = ImageCaptionDataset(examples, sizes, "center", False, 0.0, control_sizes=control_sizes(examples, sizes, d),
                                control_resize=d.control.resize if d.control is not None else "target")
    host = torch.Generator().manual_seed(options.seed)
    captions = strategy.prompts([e.caption for e in examples], torch.Generator().manual_seed(options.seed))
    encoder.cache_text(captions)
    images = []
    for index, caption in enumerate(captions):
        batch = collate([items[(index, 0)]])
        with torch.no_grad():
            mean, std = family.encode_image_moments(parts, batch["pixel_values"].to(device))
            # std 0: the latent distribution's mean, the same on any device (nothing drawn)
            latents = family.latents_from_moments(parts, mean, torch.zeros_like(std), host)
        height, width = latents.shape[-2:]
        noise = torch.randn((options.timesteps, *latents.shape[1:]), generator=host, dtype=torch.float32)
        points = objective.fixed_points(options.timesteps, height, width)
        mask = batch["masks"].to(device) if "masks" in batch else None  # a held-out training image's mask
        with torch.no_grad():  # its control images, as training feeds them (the VAE's mode)
            controls = [family.control_latents(parts, family.encode_image_moments(parts, pixels.to(device))[0])
                        for pixels in batch.get("control_pixel_values", [])]
        images.append(HeldOutImage(latents.to(device), noise.to(device), points.to(device), caption,
                                   {key: value.to(device) for key, value in batch["conditions"].items()}, mask,
                                   controls))
    return ValidationScore(images, options.every, max_steps, max(1, chunk), source, d.unmasked_weight)


@contextmanager
def _eval_mode(modules) -> Iterator[None]:
    """Every module of `modules` (and below) in eval mode within, each put back as it was on leaving."""
    modes = [(m, m.training) for module in modules for m in module.modules()]
    for m, _ in modes:
        m.training = False
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def validation_loss(run: Any, settings) -> float:
    """The run's validation score now (reads it from the device: call at a loop read point)."""
    return float(run.validation.score(run.family, run.parts, settings.objective, run.encoder,
                                      settings.text_encoder_trains))
