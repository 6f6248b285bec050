"""Stable Diffusion 1.x / 2.x: VAE + CLIP text encoder + UNet2DConditionModel, as diffusers loads them, trained
with DDPM (finetune/models/ddpm.py: epsilon, or v for SD 2.x 768 as its scheduler says)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from finetune.models import clip_prompts
from finetune.models.base import Components, unwrapped
from finetune.models.ddpm import DDPMOptions
from finetune.models.family import Family, FamilySpec
from finetune.recipe.schema import ModelOptions


@dataclass
class StableDiffusionOptions(ModelOptions, DDPMOptions):
    """`model` for model.family sd: the common keys and the DDPM objective's."""

    def problems(self) -> list[str]:
        return self.objective_problems()


class StableDiffusion(Family):
    def load_kwargs(self, base: str, options: Any) -> dict[str, Any]:
        # a diffusers folder may hold a feature extractor for the safety checker, left out; a single file has none
        return {"safety_checker": None, "requires_safety_checker": False,
                **({} if os.path.isfile(os.path.expanduser(base)) else {"feature_extractor": None})}

    def encode_prompts(self, parts: Components, captions: list[str]) -> torch.Tensor:
        """[batch, 77 x chunks, width] hidden states of CLIP's last layer (one chunk unless max_token_length)."""
        ids = clip_prompts.tokenize(parts.tokenizer, captions, parts.max_token_length)
        return clip_prompts.encode(parts.text_encoder, ids.to(self.text_device(parts)),
                                   parts.tokenizer.model_max_length)

    def caption_window(self, tokenizer: Any, max_token_length: int | None) -> int:
        """Tokens of caption text that reach the text encoder (75 for CLIP; more with max_token_length)."""
        return clip_prompts.chunk_count(tokenizer, max_token_length) * clip_prompts.content_window(tokenizer)

    def predict(self, parts: Components, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: torch.Tensor, conditions: dict[str, torch.Tensor]) -> torch.Tensor:
        """The U-Net's output [batch, 4, h, w] for `noisy` latents at `timesteps` [batch], given the prompts'
        `conditioning` (encode_prompts); SD uses none of the image `conditions`."""
        # a half-precision U-Net outside autocast (the frozen copy prior preservation keeps) needs its own dtype;
        # for the trained, autocast U-Net the cast is a no-op
        dtype = unwrapped(parts.unet).dtype
        return parts.unet(noisy.to(dtype), timesteps, conditioning.to(dtype)).sample


def build_tiny(seed: int = 0) -> Any:
    from finetune.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline(seed)


SPEC = FamilySpec(
    name="sd", title="Stable Diffusion 1.x/2.x", pipeline="StableDiffusionPipeline", objective="ddpm",
    # train.compile: blocks; the U-Net's attention and ResNet blocks
    compile_blocks=("BasicTransformerBlock", "ResnetBlock2D"),
    offload_blocks=(),
    objective_defaults=(
        "DDPM with the base scheduler's prediction type (epsilon; SD 2.x 768: v), uniform timesteps, plain MSE; "
        "model.min_snr_gamma and model.noise_offset opt in (diffusers' train_text_to_image_lora.py, kohya's "
        'options)'),
    options=StableDiffusionOptions, behaviour=StableDiffusion, tiny=build_tiny,
    also_recognised=("StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"),
    single_file_keys=("input_blocks.",),  # the original U-Net
    lora_targets=("to_q", "to_k", "to_v", "to_out.0"),
    # LoCon-style convolutions (strategy.conv_layers): every Conv2d of the U-Net's ResNet blocks (3x3 conv1/conv2,
    # 1x1 conv_shortcut) and of its down/upsamplers, as kohya's LoCon adapts; not conv_in/conv_out, whose
    # latent-channel shapes the base fixes. peft matches these as name tails (e.g. `mid_block.resnets.1.conv2`).
    conv_lora_targets=("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv"),
    text_encoder_lora_targets=("q_proj", "k_proj", "v_proj", "out_proj"),
    hypernetwork_text_stream=None,  # hypernetworks rewrite the U-Net's cross-attention context (A1111's design)
    kohya_prefixes={"unet": "lora_unet", "text_encoder": "lora_te"},
    single_file_layout="ldm",
    kohya_unet_layout="diffusers",  # kohya's SD 1.x/2.x files name U-Net modules as diffusers does
    kohya_base_model_version=None,  # sd_v1 or sd_v2: told from the text encoder's width
    long_prompts=True,
    pipeline_kwargs={"requires_safety_checker": False})
