"""Stable Diffusion 1.x / 2.x: VAE + CLIP text encoder + UNet2DConditionModel, as diffusers loads them."""
from __future__ import annotations

import os
from typing import Any

import torch

from finetune.models import clip_prompts
from finetune.models.base import Components, ModelLoadError, pipeline_components
from finetune.models.ddpm import DDPMObjective


class StableDiffusion:
    name = "sd"
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    # LoCon-style convolutions (strategy.conv_layers): every Conv2d of the U-Net's ResNet blocks (3x3 conv1/conv2,
    # 1x1 conv_shortcut) and of its down/upsamplers, as kohya's LoCon adapts; not conv_in/conv_out, whose
    # latent-channel shapes the base fixes. peft matches these as name tails (e.g. `mid_block.resnets.1.conv2`).
    conv_lora_targets = ("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv")
    text_encoder_lora_targets = ("q_proj", "k_proj", "v_proj", "out_proj")

    def load(self, base: str, *, revision: str | None = None, variant: str | None = None,
             dtype: torch.dtype = torch.float32, config: str | None = None, vae: str | None = None) -> Components:
        """The frozen base from a hub id, a diffusers folder or a single checkpoint; `vae` replaces its VAE (a
        folder holding one, a pipeline folder, a single file, or a hub id), e.g. a fine-tuned or fp16-safe one."""
        from diffusers import DDPMScheduler, StableDiffusionPipeline

        path = os.path.expanduser(base)
        try:
            if os.path.isfile(path):
                refuse_unsafe_pickle(path)
                pipe = StableDiffusionPipeline.from_single_file(
                    path, config=config, dtype=dtype, safety_checker=None, requires_safety_checker=False)
            else:
                pipe = StableDiffusionPipeline.from_pretrained(
                    path, revision=revision, variant=variant, dtype=dtype,
                    safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        except ModelLoadError:
            raise
        except (OSError, ValueError, EnvironmentError) as exc:
            raise ModelLoadError(_explain_load_failure(base, exc)) from exc
        if vae is not None:
            try:
                pipe.vae = load_vae(vae, dtype)
            except (OSError, ValueError, EnvironmentError) as exc:
                raise ModelLoadError(_explain_load_failure(vae, exc, key="model.vae")) from exc
        parts = pipeline_components(pipe, base, DDPMScheduler.from_config(pipe.scheduler.config),
                                    {"sampling_scheduler": pipe.scheduler})
        for module in parts.modules.values():
            module.requires_grad_(False)
            module.eval()
        return parts

    def objective(self, parts: Components, *, prediction_type: str | None, noise_offset: float,
                  min_snr_gamma: float | None) -> DDPMObjective:
        """DDPM with the base's noise schedule; `prediction_type` None: the scheduler's own (v for SD 2.x 768)."""
        return DDPMObjective(parts.noise_scheduler, prediction_type or parts.noise_scheduler.config.prediction_type,
                             noise_offset, min_snr_gamma)

    def text_encoders(self, parts: Components) -> list[tuple[str, Any, Any]]:
        """(name, tokenizer, text encoder) triples; SD has one."""
        return [("text_encoder", parts.tokenizer, _unwrapped(parts.text_encoder))]

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

    def tokenize(self, parts: Components, captions: list[str]) -> torch.Tensor:
        tokenizer = parts.tokenizer
        if parts.max_token_length:  # kohya's / AUTOMATIC1111's long prompts: chunks of 75, each with its ends
            return clip_prompts.token_ids(tokenizer, captions, clip_prompts.chunk_count(tokenizer,
                                                                                         parts.max_token_length))
        return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids

    def encode_prompts(self, parts: Components, captions: list[str]) -> torch.Tensor:
        """[batch, 77 x chunks, width] hidden states of CLIP's last layer (one chunk unless max_token_length)."""
        ids = self.tokenize(parts, captions)
        device = next(_unwrapped(parts.text_encoder).parameters()).device
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
                conditioning: torch.Tensor) -> torch.Tensor:
        # a half-precision U-Net outside autocast (the frozen copy prior preservation keeps) needs its own dtype;
        # for the trained, autocast U-Net the cast is a no-op
        dtype = _unwrapped(parts.unet).dtype
        return parts.unet(noisy.to(dtype), timesteps, conditioning.to(dtype)).sample

    def save_single_file(self, parts: Components, path: str, metadata: dict[str, str] | None = None,
                         dtype: torch.dtype | None = None) -> Any:
        """One original-layout checkpoint (AUTOMATIC1111's, ComfyUI's), finetune/export/single_file.py."""
        from finetune.export.single_file import save_single_file

        return save_single_file(path, parts.unet, parts.vae, parts.text_encoder, metadata=metadata, dtype=dtype)

    def pipeline(self, parts: Components, unwrap: Any = None) -> Any:
        """An inference pipeline sharing the (possibly adapted) modules; `unwrap` strips DDP wrappers."""
        from diffusers import StableDiffusionPipeline

        unwrap = unwrap or _unwrapped
        return StableDiffusionPipeline(
            vae=parts.vae, text_encoder=unwrap(parts.text_encoder), tokenizer=parts.tokenizer,
            unet=unwrap(parts.unet), scheduler=parts.extra["sampling_scheduler"],
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def load_vae(source: str, dtype: torch.dtype) -> Any:
    """An AutoencoderKL from a folder holding one (config.json), a pipeline folder (its vae/), a single file, or
    a hub id."""
    from diffusers import AutoencoderKL

    path = os.path.expanduser(source)
    if os.path.isfile(path):
        refuse_unsafe_pickle(path)
        return AutoencoderKL.from_single_file(path, torch_dtype=dtype)
    subfolder = "vae" if os.path.isdir(os.path.join(path, "vae")) else None
    return AutoencoderKL.from_pretrained(path, subfolder=subfolder, torch_dtype=dtype)


def _unwrapped(module: Any) -> Any:
    return getattr(module, "module", module)


def refuse_unsafe_pickle(path: str) -> None:
    """A .ckpt/.pt/.bin is a pickle that could run code; accept it only if it loads with weights_only=True."""
    if path.lower().endswith(".safetensors"):
        return
    from finetune.export.pickle_files import UnsafePickleError, load_plain_pickle

    try:
        load_plain_pickle(path, "checkpoint", mmap=True)  # mmap: a 4 GB checkpoint is not read into memory
    except UnsafePickleError:
        raise ModelLoadError(
            f"model.base: {path} is a pickle that needs more than plain tensors to load (it could run code), "
            "so it was not loaded. Convert it to .safetensors with a tool you trust, or use the model's "
            "diffusers folder"
        ) from None


def _explain_load_failure(base: str, exc: Exception, key: str = "model.base") -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    text = f"could not load {key} {base!r}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if not os.path.exists(os.path.expanduser(base)):
        why = "HF_HUB_OFFLINE is set" if offline else "the hub may be unreachable from this machine"
        text += (f"\n  {base!r} is not a local path, so it was looked up on the Hugging Face hub and {why}. "
                 f"Download it where there is network (`huggingface-cli download {base} --local-dir DIR`) "
                 f"and set {key} to that folder.")
    return text
