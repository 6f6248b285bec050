"""Where a training step's random numbers come from, so that a step never waits on a host-device round trip.

Each micro-step draws from generators seeded with its own seed (training/loop.py's step_seed: a function of the
recipe's seed, the step, the micro-step and the process), in two kinds:
- tensor draws (the VAE latent's sample, noise, timesteps or sigmas) from a generator on the run's device, so the
  numbers are made where they are used and no copy from the host (which would make the host wait) is needed;
- host choices (textual inversion's template picks, base_prediction's class-prompt picks: list indices the
  Python code needs) from a CPU generator, so that making them never reads a device tensor.

On a CPU both are ONE generator object, so the draws come in exactly the order and with exactly the values they
always had (tests/contracts/golden_losses.json pins them). What changes across devices: a CUDA generator's
numbers differ from a CPU generator's for the same seed (a different algorithm, Philox), so a run on a GPU draws
other noise and timesteps than the same recipe on a CPU, and its losses differ from the CPU's beyond rounding.
A run stays bit-identical to itself on one device (same seed, same device type, same kernels), and a resumed run
repeats the uninterrupted one there, since every micro-step reseeds.

It sits at the package's top level, below both the loop and the strategies, since both draw through it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class StepDraws:
    """The generators of one micro-step. `tensors`: on the run's device (noise, timesteps, latent samples);
    `host`: on the CPU (choices Python acts on). The same object on a CPU run."""
    tensors: torch.Generator
    host: torch.Generator


def step_draws(seed: int, device: torch.device | str) -> StepDraws:
    """Both generators of a micro-step, seeded with `seed`; one generator when `device` is the CPU (module
    docstring: the CPU's draws stay as they always were)."""
    device = torch.device(device)
    host = torch.Generator().manual_seed(seed)
    if device.type == "cpu":
        return StepDraws(tensors=host, host=host)
    return StepDraws(tensors=torch.Generator(device).manual_seed(seed), host=host)


def host_choices(count: int, options: Sequence, generator: torch.Generator) -> list:
    """`count` items of `options` picked uniformly with replacement, drawn from a CPU `generator` (the same draw
    `torch.randint(len(options), (count,))` has always made). Raises ValueError for a generator on another device:
    reading its draw back would make the host wait for the device."""
    if generator.device.type != "cpu":
        raise ValueError(f"host choices are drawn from a CPU generator, not one on {generator.device}: pass "
                         "StepDraws.host")
    picks = torch.randint(len(options), (count,), generator=generator)
    return [options[i] for i in picks.tolist()]  # a CPU tensor: no device to wait for
