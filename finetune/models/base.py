"""What the loop and strategies need from a model family, so that neither asks which family it runs on."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


class ModelLoadError(RuntimeError):
    """The base model could not be loaded; the message says why and what to do."""


@dataclass
class Components:
    """The loaded base. `unet` and `text_encoder` may be replaced by distributed wrappers during training."""

    vae: Any
    text_encoder: Any
    tokenizer: Any
    unet: Any
    noise_scheduler: Any  # a training scheduler (DDPM) with the base's noise schedule
    source: str  # what model.base said, for metadata
    extra: dict[str, Any] = field(default_factory=dict)  # family-specific parts (e.g. a second encoder)
    # data.max_token_length: captions encoded whole up to this many tokens (kohya/A1111 long prompts); None: the
    # text encoder's own window. Training, its caches and sample grids all read it from here
    max_token_length: int | None = None


class ModelFamily(Protocol):
    name: str
    lora_targets: tuple[str, ...]  # default LoRA target modules in the denoiser
    conv_lora_targets: tuple[str, ...]  # the denoiser's convolutions that strategy.conv_layers adds
    text_encoder_lora_targets: tuple[str, ...]

    def load(self, base: str, *, revision: str | None, variant: str | None, dtype: torch.dtype,
             config: str | None, vae: str | None = None) -> Components: ...

    def objective(self, parts: Components, *, prediction_type: str | None, noise_offset: float,
                  min_snr_gamma: float | None) -> Any:
        """How latents are noised and what is regressed: `noise(latents, generator)` -> noisy input, timesteps
        and target; `weights(timesteps)` -> per-sample loss weights or None (finetune/models/ddpm.py)."""

    def text_encoders(self, parts: Components) -> list[tuple[str, Any, Any]]: ...

    def encode_images(self, parts: Components, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor: ...

    def encode_image_moments(self, parts: Components, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def latents_from_moments(self, parts: Components, mean: torch.Tensor, std: torch.Tensor,
                             generator: torch.Generator) -> torch.Tensor: ...

    def encode_prompts(self, parts: Components, captions: list[str]) -> Any: ...

    def caption_window(self, tokenizer: Any, max_token_length: int | None) -> int: ...

    def tokenizer_of(self, base: str) -> Any | None: ...

    def predict(self, parts: Components, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: Any) -> torch.Tensor: ...

    def pipeline(self, parts: Components, unwrap: Any = None) -> Any: ...
