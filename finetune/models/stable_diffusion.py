"""Stable Diffusion 1.x / 2.x: VAE + CLIP text encoder + UNet2DConditionModel, as diffusers loads them."""
from __future__ import annotations

import os
from typing import Any

import torch

from finetune.models import clip_prompts
from finetune.models.base import Components, unwrapped
from finetune.models.loading import load_frozen
from finetune.models.ddpm import DDPMObjective


class StableDiffusion:
    name = "sd"
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    # LoCon-style convolutions (strategy.conv_layers): every Conv2d of the U-Net's ResNet blocks (3x3 conv1/conv2,
    # 1x1 conv_shortcut) and of its down/upsamplers, as kohya's LoCon adapts; not conv_in/conv_out, whose
    # latent-channel shapes the base fixes. peft matches these as name tails (e.g. `mid_block.resnets.1.conv2`).
    conv_lora_targets = ("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv")
    text_encoder_lora_targets = ("q_proj", "k_proj", "v_proj", "out_proj")
    kohya_prefixes = {"unet": "lora_unet", "text_encoder": "lora_te"}
    kohya_unet_layout = "diffusers"  # kohya's SD 1.x/2.x files name U-Net modules as diffusers does
    embedding_keys: dict[str, str] = {}  # one text encoder: the embedding file is keyed by the token
    kohya_base_model_version = None  # sd_v1 or sd_v2: told from the text encoder's width
    hypernetwork_text_stream = None  # hypernetworks rewrite the U-Net's cross-attention context (A1111's design)

    def load(self, base: str, *, revision: str | None = None, variant: str | None = None,
             dtype: torch.dtype = torch.float32, config: str | None = None, vae: str | None = None,
             without: tuple[str, ...] = ()) -> Components:
        """The frozen base from a hub id, a diffusers folder or a single checkpoint; `vae` replaces its VAE (a
        folder holding one, a pipeline folder, a single file, or a hub id), e.g. a fine-tuned or fp16-safe one.
        `without`: parts to leave out (none here; validate refuses asking)."""
        from diffusers import StableDiffusionPipeline

        return load_frozen(StableDiffusionPipeline, base, revision=revision, variant=variant, dtype=dtype,
                           config=config, vae=vae, extra_kwargs={
                               "safety_checker": None, "requires_safety_checker": False,
                               **({} if os.path.isfile(os.path.expanduser(base)) else {"feature_extractor": None})})

    def objective(self, parts: Components, *, prediction_type: str | None, noise_offset: float,
                  min_snr_gamma: float | None) -> DDPMObjective:
        """DDPM with the base's noise schedule; `prediction_type` None: the scheduler's own (v for SD 2.x 768)."""
        return DDPMObjective(parts.noise_scheduler, prediction_type or parts.noise_scheduler.config.prediction_type,
                             noise_offset, min_snr_gamma)

    def text_encoders(self, parts: Components) -> list[tuple[str, Any, Any]]:
        """(name, tokenizer, text encoder) triples; SD has one."""
        return [("text_encoder", parts.tokenizer, unwrapped(parts.text_encoder))]

    def encode_images(self, parts: Components, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.latents_from_moments(parts, *self.encode_image_moments(parts, pixels), generator)

    def encode_image_moments(self, parts: Components, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's latent distribution (mean, std) for the images: what a latent cache keeps."""
        vae = parts.vae
        distribution = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        return distribution.mean, distribution.std

    def latents_from_moments(self, parts: Components, mean: torch.Tensor, std: torch.Tensor,
                             generator: torch.Generator) -> torch.Tensor:
        """One latent sample, scaled for the denoiser; the same draw diffusers' `latent_dist.sample` makes."""
        from diffusers.utils.torch_utils import randn_tensor

        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return (mean + std * noise).float() * parts.vae.config.scaling_factor

    def encode_prompts(self, parts: Components, captions: list[str]) -> torch.Tensor:
        """[batch, 77 x chunks, width] hidden states of CLIP's last layer (one chunk unless max_token_length)."""
        ids = clip_prompts.tokenize(parts.tokenizer, captions, parts.max_token_length)
        device = next(unwrapped(parts.text_encoder).parameters()).device
        return clip_prompts.encode(parts.text_encoder, ids.to(device), parts.tokenizer.model_max_length)

    def caption_window(self, tokenizer: Any, max_token_length: int | None) -> int:
        """Tokens of caption text that reach the text encoder (75 for CLIP; more with max_token_length)."""
        return clip_prompts.chunk_count(tokenizer, max_token_length) * clip_prompts.content_window(tokenizer)

    def tokenizer_of(self, base: str) -> Any | None:
        """The base's tokenizer without its models (for `finetune validate`): from a diffusers folder's
        `tokenizer/`; None for a hub id or a single file, whose tokenizer comes with loading."""
        from transformers import CLIPTokenizer

        folder = os.path.join(os.path.expanduser(base), "tokenizer")
        return CLIPTokenizer.from_pretrained(folder) if os.path.isdir(folder) else None

    def predict(self, parts: Components, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: torch.Tensor, conditions: dict[str, torch.Tensor]) -> torch.Tensor:
        """The U-Net's output [batch, 4, h, w] for `noisy` latents at `timesteps` [batch], given the prompts'
        `conditioning` (encode_prompts); SD uses none of the image `conditions`."""
        # a half-precision U-Net outside autocast (the frozen copy prior preservation keeps) needs its own dtype;
        # for the trained, autocast U-Net the cast is a no-op
        dtype = unwrapped(parts.unet).dtype
        return parts.unet(noisy.to(dtype), timesteps, conditioning.to(dtype)).sample

    def save_single_file(self, parts: Components, path: str, metadata: dict[str, str] | None = None,
                         dtype: torch.dtype | None = None) -> Any:
        """One original-layout checkpoint (AUTOMATIC1111's, ComfyUI's), finetune/export/single_file.py."""
        from finetune.export.single_file import save_single_file

        return save_single_file(path, parts.unet, parts.vae, parts.text_encoder, metadata=metadata, dtype=dtype)

    def pipeline(self, parts: Components, unwrap: Any = None) -> Any:
        """An inference pipeline sharing the (possibly adapted) modules; `unwrap` strips DDP wrappers."""
        from diffusers import StableDiffusionPipeline

        unwrap = unwrap or unwrapped
        return StableDiffusionPipeline(
            vae=parts.vae, text_encoder=unwrap(parts.text_encoder), tokenizer=parts.tokenizer,
            unet=unwrap(parts.unet), scheduler=parts.extra["sampling_scheduler"],
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
