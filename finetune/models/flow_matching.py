"""The flow-matching (rectified flow) objective of the transformer families (SD3.5, Flux.1, Z-Image): what their
`objective` returns, and all the training loop knows of sigmas, targets and loss weights.

Latents are noised along a straight line, `x_t = (1 - sigma) x0 + sigma noise`, and the target is the velocity
`noise - x0` (Esser et al. 2024, "Scaling Rectified Flow Transformers"; diffusers' train_dreambooth_lora_sd3.py
and _flux.py). sigma is drawn from a density, as the anchors offer (recipe section `flow`):
- `uniform`: u ~ U(0, 1);
- `logit_normal`: u = sigmoid(N(logit_mean, logit_std)) (SD3's paper and script default, mean 0, std 1);
- `mode`: u ~ U(0, 1) bent by `mode_scale` (1 - u - s (cos^2(pi u / 2) - 1 + u), the SD3 paper's mode sampling);
- `sigmoid`: u = sigmoid(sigmoid_scale N(0, 1)) (kohya's and ai-toolkit's Flux default);
then shifted: statically, sigma = s u / (1 + (s - 1) u) (SD3's scheduler, shift 3), or by the image's token count,
sigma = e^mu / (e^mu + 1/u - 1) with mu linear in the count (FluxPipeline's `calculate_shift`, as Flux samples).
Optional per-sample loss weights: `sigma_sqrt` (sigma^-2) or `cosmap` (2 / (pi (1 - 2 sigma + 2 sigma^2))),
diffusers' compute_loss_weighting_for_sd3. Draws come in a fixed order (noise, then u) from the step's generator,
on its device (finetune/draws.py says what that changes across devices).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Optional

import torch

from finetune.models.ddpm import Noised
from finetune.recipe.keys import key

SAMPLINGS = ("uniform", "logit_normal", "mode", "sigmoid")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


@dataclass
class FlowOptions:
    """How sigma is drawn and the loss weighted: `model.flow` of a flow-matching family (sd3, flux, zimage, ...);
    "auto" and None take the family's defaults (README, "Flow-matching families")."""
    sigma_sampling: Literal["auto", "uniform", "logit_normal", "mode", "sigmoid"] = key(
        "auto", "The density sigma is drawn from: `uniform`; `logit_normal`, sigmoid(N(logit_mean, logit_std)) (SD3's "
                "paper); `mode`, the SD3 paper's mode sampling; `sigmoid`, sigmoid(sigmoid_scale N(0, 1)); `auto`: "
                "the family's.")
    logit_mean: float = key(0.0, "`logit_normal` sampling: the mean of the normal draw before the sigmoid.")
    logit_std: float = key(1.0, "`logit_normal` sampling: the standard deviation of the normal draw before the "
                                "sigmoid.", above=0)
    mode_scale: float = key(1.29, "`mode` sampling: how far the SD3 paper's mode sampling bends the uniform draw.")
    sigmoid_scale: float = key(1.0, "`sigmoid` sampling: the scale of the normal draw before the sigmoid.")
    shift: Optional[float] = key(None, "A static shift s of sigma, s u / (1 + (s - 1) u): above 1 trains more at "
                                       "high noise (SD3's is 3.0); null: the family's.", above=0, hint="3.0 is SD3's")
    resolution_shift: Optional[bool] = key(None, "Shift sigma by the image's token count, as Flux samples; null: the "
                                                 "family's.")
    weighting: Literal["none", "sigma_sqrt", "cosmap"] = key(
        "none", "Per-sample loss weights, as the SD3 training script offers: `none`, `sigma_sqrt` (sigma^-2) or "
                "`cosmap`.")


@dataclass
class FlowMatchingOptions:
    """The flow-matching objective's recipe keys, in the `model` section of a family that trains with it."""
    reference_title: ClassVar[str] = "flow-matching"  # the recipe reference's heading for these keys
    flow: FlowOptions = key(factory=FlowOptions, help="How sigma is drawn and the loss weighted.")

    def objective_problems(self) -> list[str]:
        """What the objective's keys get wrong together (each key's own bounds are declared on it)."""
        return []


@dataclass(frozen=True)
class ResolutionShift:
    """mu = base_shift at `base_tokens` image tokens, max_shift at `max_tokens`, linear between (Flux.1's scheduler
    config: 0.5 at 256, 1.15 at 4096); the latent side is divided by `patch` to count tokens. `time_shift`: the
    scheduler config's `time_shift_type`, how mu shifts sigma (FlowMatchEulerDiscreteScheduler.time_shift):
    "exponential", e^mu / (e^mu + 1/u - 1), or "linear", mu / (mu + 1/u - 1)."""
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_tokens: int = 256
    max_tokens: int = 4096
    patch: int = 2
    time_shift: str = "exponential"

    def mu(self, height: int, width: int) -> float:
        tokens = (height // self.patch) * (width // self.patch)
        slope = (self.max_shift - self.base_shift) / (self.max_tokens - self.base_tokens)
        return self.base_shift + slope * (tokens - self.base_tokens)


@dataclass(frozen=True)
class FlowMatchingObjective:
    sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    sigmoid_scale: float = 1.0
    shift: Optional[float] = None  # static shift; None: none (or the resolution's)
    resolution_shift: Optional[ResolutionShift] = None
    weighting: str = "none"

    def draw(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """u in (0, 1) for `batch` samples, from the chosen density (before any shift), on the generator's device."""
        on = generator.device
        if self.sampling == "logit_normal":
            return torch.sigmoid(torch.normal(self.logit_mean, self.logit_std, (batch,), generator=generator,
                                              device=on))
        if self.sampling == "sigmoid":
            return torch.sigmoid(self.sigmoid_scale * torch.randn(batch, generator=generator, device=on))
        u = torch.rand(batch, generator=generator, device=on)
        if self.sampling == "mode":
            return 1 - u - self.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        if self.sampling != "uniform":
            raise ValueError(f"unknown sigma sampling {self.sampling!r}; one of {', '.join(SAMPLINGS)}")
        return u

    def shifted(self, u: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """sigma for u, for latents of `height` x `width`."""
        if self.resolution_shift is not None:
            mu = self.resolution_shift.mu(height, width)
            scale = mu if self.resolution_shift.time_shift == "linear" else math.exp(mu)
            return scale / (scale + (1 / u - 1))
        if self.shift is not None:
            return self.shift * u / (1 + (self.shift - 1) * u)
        return u

    def noise(self, latents: torch.Tensor, generator: torch.Generator) -> Noised:
        """Noise for `latents` [batch, channels, h, w], drawn from `generator` on its device (the run's: no copy
        from the host), then sigma; the `timesteps` of the result are the sigmas [batch] in (0, 1) (a family's
        predict scales them as its denoiser takes them)."""
        shape, device = latents.shape, latents.device
        noise = torch.randn(shape, generator=generator, dtype=torch.float32, device=generator.device)
        sigmas = self.shifted(self.draw(shape[0], generator), shape[-2], shape[-1]).float()
        # nothing to copy when the generator is on the latents' device, as the loop's is
        noise, sigmas = noise.to(device), sigmas.to(device)
        return self.noised(latents, noise, sigmas)

    def noised(self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> Noised:
        """`latents` noised with the given `noise` (their shape) at `sigmas` [batch], all on one device."""
        s = sigmas.view(-1, *([1] * (latents.ndim - 1)))
        return Noised(latents, (1 - s) * latents + s * noise, sigmas, noise - latents)

    def quantiles(self, q: torch.Tensor) -> torch.Tensor:
        """u (before any shift) at probabilities `q` of the chosen density: its inverse distribution function
        (Phi^-1 = torch.special.ndtri for the normal-based ones)."""
        if self.sampling == "logit_normal":
            return torch.sigmoid(self.logit_mean + self.logit_std * torch.special.ndtri(q))
        if self.sampling == "sigmoid":
            return torch.sigmoid(self.sigmoid_scale * torch.special.ndtri(q))
        if self.sampling == "mode":
            # the mode map falls as u rises (for mode_scale < 1 / (pi/2 - 1) = 1.75), so the q-quantile of its
            # output is its value at 1 - q
            u = 1 - q
            return 1 - u - self.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        return q

    def fixed_points(self, count: int, height: int, width: int) -> torch.Tensor:
        """`count` sigmas [count] (fp32, on the CPU) spread over the schedule as `noise` draws them for latents of
        `height` x `width`: the quantiles (k + 1/2) / count of the sigma density, shift included, so a validation
        score is a stratified estimate of what the training loss averages."""
        q = (torch.arange(count, dtype=torch.float64) + 0.5) / count
        return self.shifted(self.quantiles(q), height, width).float()

    def weights(self, sigmas: torch.Tensor) -> torch.Tensor | None:
        """Per-sample loss weights, or None for plain MSE."""
        if self.weighting == "sigma_sqrt":
            return sigmas.float() ** -2.0
        if self.weighting == "cosmap":
            return 2 / (math.pi * (1 - 2 * sigmas.float() + 2 * sigmas.float() ** 2))
        if self.weighting != "none":
            raise ValueError(f"unknown loss weighting {self.weighting!r}; one of {', '.join(WEIGHTINGS)}")
        return None


def shifted_as_the_scheduler(flow: dict[str, Any], scheduler_config: Any, sampling: str,
                             always_dynamic: bool = False) -> dict[str, Any]:
    """A family's `flow_defaults` that shift sigma as its base's sampling scheduler does: by the image's token
    count where the scheduler shifts dynamically (or `always_dynamic`: the pipeline computes mu itself, Flux's
    calculate_shift), else by its static `shift`. A recipe's static `model.flow.shift` alone (no
    `resolution_shift`) turns the resolution shift off."""
    dynamic = always_dynamic or bool(scheduler_config.get("use_dynamic_shifting", False))
    return {"sigma_sampling": sampling, "shift": None if dynamic else scheduler_config.get("shift", 1.0),
            "resolution_shift": dynamic and (flow.get("shift") is None or flow.get("resolution_shift") is not None)}


def from_recipe(flow: dict[str, Any], defaults: dict[str, Any], scheduler_config: Any) -> FlowMatchingObjective:
    """The objective from the recipe's `flow` values (sigma_sampling, shift, ...), a family's `defaults` filling
    what says auto / None; a resolution shift takes its constants from the sampling scheduler's config
    (base_shift, max_shift, base_image_seq_len, max_image_seq_len, time_shift_type), as the pipeline samples."""
    chosen = {key: (defaults.get(key) if value in ("auto", None) else value) for key, value in flow.items()}
    resolution = None
    if chosen.pop("resolution_shift"):
        get = scheduler_config.get
        resolution = ResolutionShift(get("base_shift", 0.5), get("max_shift", 1.15), get("base_image_seq_len", 256),
                                     get("max_image_seq_len", 4096), time_shift=get("time_shift_type", "exponential"))
    return FlowMatchingObjective(sampling=chosen.pop("sigma_sampling"), resolution_shift=resolution, **chosen)
