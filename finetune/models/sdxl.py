"""Stable Diffusion XL: VAE + CLIP ViT-L (`text_encoder`) + OpenCLIP bigG with projection (`text_encoder_2`) +
a UNet2DConditionModel with `addition_embed_type="text_time"`, as diffusers' StableDiffusionXLPipeline loads them.

What differs from SD 1.x/2.x (diffusers' train_text_to_image_lora_sdxl.py and pipeline `encode_prompt`):
- conditioning: both encoders' penultimate hidden states concatenated (768 + 1280 = 2048 wide), and the second
  encoder's projected pooled output (1280);
- micro-conditioning: per sample `time_ids` = original size (h, w) + crop top-left (top, left) + target size
  (h, w), from what the data pipeline recorded for each image (finetune/data/images.py `size_conditions`);
- the released VAE overflows in fp16 (`force_upcast: true` in its config): it stays in fp32 unless it says
  it is safe (the fp16-fix VAE through `model.vae`).
The objective is the same DDPM as SD's (epsilon by default).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from finetune.models import clip_prompts
from finetune.models.base import Components, unwrapped
from finetune.models.ddpm import DDPMOptions
from finetune.models.family import Family, FamilySpec
from finetune.models.loading import cast, load_frozen
from finetune.recipe.schema import ModelOptions


# the released SDXL 1.0 base U-Net's layout (its unet/config.json, the parts that shape module names), for reading
# kohya files without the base at hand
RELEASED_UNET_CONFIG = {
    "block_out_channels": (320, 640, 1280), "layers_per_block": 2, "cross_attention_dim": 2048,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20), "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816}


@dataclass
class StableDiffusionXLOptions(ModelOptions, DDPMOptions):
    """`model` for model.family sdxl: the common keys and the DDPM objective's."""

    def problems(self) -> list[str]:
        return self.objective_problems()


class StableDiffusionXL(Family):
    def load(self, base: str, *, revision: str | None = None, variant: str | None = None,
             dtype: torch.dtype = torch.float32, config: str | None = None, vae: str | None = None,
             options: Any = None) -> Components:
        """As Family.load; the VAE is kept in fp32 when its config says half precision is not safe
        (`force_upcast`, the released SDXL VAE: NaN latents in fp16). It is read from its file in fp32 (not
        rounded to `dtype` and cast back), and follows `dtype` only when its config says it is safe there."""
        parts = load_frozen(self.pipeline_class(), base, revision=revision, variant=variant, dtype=dtype,
                            config=config, vae=vae, extra_kwargs={},
                            part_dtypes={"vae": torch.float32} if dtype != torch.float32 else None)
        if getattr(parts.vae.config, "force_upcast", False) and dtype != torch.float32:
            # the pipeline hands the decoder latents in the U-Net's dtype (it casts them only for a VAE it upcasts
            # itself, one still in fp16): the upcast VAE takes them in its own
            first = parts.vae.post_quant_conv if parts.vae.post_quant_conv is not None else parts.vae.decoder
            first.register_forward_pre_hook(_in_own_dtype)
        elif parts.vae.dtype != dtype:
            cast(parts.vae, dtype)  # an fp16-safe VAE (sdxl-vae-fp16-fix) follows the base
        parts.options = options if options is not None else self.spec.options()
        return parts

    def text_encoders(self, parts: Components) -> list[tuple[str, Any, Any]]:
        """(name, tokenizer, text encoder) for CLIP-L and CLIP-G, in the pipeline's order."""
        return [(name, tokenizer, unwrapped(parts.modules[name]))
                for name, tokenizer in zip(parts.text_encoder_names, _tokenizers(parts))]

    def encode_image_moments(self, parts: Components, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As SD's, in the VAE's own dtype (fp32 for an upcast VAE); fp16 autocast would undo the upcast."""
        device_type = parts.vae.device.type
        with torch.autocast(device_type, enabled=False):
            return super().encode_image_moments(parts, pixels)

    def encode_prompts(self, parts: Components, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states [batch, 77 x chunks, 2048]: both encoders' penultimate layers side by side, pooled
        [batch, 1280]: CLIP-G's projection), as StableDiffusionXLPipeline.encode_prompt builds them."""
        states, pooled = [], None
        for (name, tokenizer, encoder) in self.text_encoders(parts):
            ids = clip_prompts.tokenize(tokenizer, captions, parts.max_token_length)
            device = next(encoder.parameters()).device
            hidden, projected = clip_prompts.encode_penultimate(parts.modules[name], ids.to(device),
                                                                tokenizer.model_max_length)
            states.append(hidden)
            pooled = projected if projected is not None else pooled  # the last encoder's, as the pipeline
        return torch.cat(states, dim=-1), pooled

    def caption_window(self, tokenizer: Any, max_token_length: int | None) -> int:
        """Tokens of caption text that reach the text encoders (75 for CLIP; more with max_token_length)."""
        return clip_prompts.chunk_count(tokenizer, max_token_length) * clip_prompts.content_window(tokenizer)

    def predict(self, parts: Components, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: tuple[torch.Tensor, torch.Tensor], conditions: dict[str, torch.Tensor]
                ) -> torch.Tensor:
        """The U-Net's output for `noisy` latents; `conditions` give each sample's `time_ids`."""
        hidden, pooled = conditioning
        dtype = unwrapped(parts.unet).dtype
        added = {"text_embeds": pooled.to(dtype), "time_ids": time_ids(conditions).to(noisy.device, dtype)}
        return parts.unet(noisy.to(dtype), timesteps, hidden.to(dtype), added_cond_kwargs=added).sample


def time_ids(conditions: dict[str, torch.Tensor]) -> torch.Tensor:
    """[batch, 6]: original (h, w) + crop top-left (top, left) + target (h, w), the order of the pipeline's
    `_get_add_time_ids` and the training scripts' `compute_time_ids`."""
    return torch.cat([conditions["original_sizes"], conditions["crop_top_lefts"], conditions["target_sizes"]],
                     dim=1).float()


def _tokenizers(parts: Components) -> list[Any]:
    return [parts.tokenizers[key] for key in sorted(parts.tokenizers, key=lambda k: (len(k), k))]


def _in_own_dtype(module: torch.nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: the first input in the module's own dtype."""
    return (args[0].to(next(module.parameters()).dtype), *args[1:])


def build_tiny(seed: int = 0) -> Any:
    from finetune.models.tiny import build_tiny_sdxl_pipeline

    return build_tiny_sdxl_pipeline(seed)


SPEC = FamilySpec(
    name="sdxl", title="Stable Diffusion XL", pipeline="StableDiffusionXLPipeline", objective="ddpm",
    # train.compile: blocks; the U-Net's attention and ResNet blocks
    compile_blocks=("BasicTransformerBlock", "ResnetBlock2D"),
    offload_blocks=(),
    objective_defaults=(
        "as sd's: DDPM with the base scheduler's prediction type, uniform timesteps, plain MSE (diffusers' "
        'train_text_to_image_lora_sdxl.py)'),
    options=StableDiffusionXLOptions, behaviour=StableDiffusionXL, tiny=build_tiny,
    also_recognised=("StableDiffusionXLImg2ImgPipeline",),
    single_file_keys=("input_blocks.", "conditioner.embedders.1."),  # the U-Net, and SDXL's second text encoder
    lora_targets=("to_q", "to_k", "to_v", "to_out.0"),
    conv_lora_targets=("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv"),
    text_encoder_lora_targets=("q_proj", "k_proj", "v_proj", "out_proj"),
    hypernetwork_text_stream=None,  # the U-Net's cross-attention context, as SD's (A1111's design)
    # kohya's LoRA key prefixes for SDXL (its sdxl_train_network.py): lora_te1_ / lora_te2_
    kohya_prefixes={"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
    single_file_layout="sgm",
    kohya_unet_layout="sgm",  # kohya's SDXL U-Net is Stability's code: its files use the original module names
    kohya_base_model_version="sdxl_base_v1-0",
    released_unet_config=RELEASED_UNET_CONFIG,
    # the text-encoder file keys AUTOMATIC1111, ComfyUI and kohya use for SDXL embeddings, per pipeline part
    embedding_keys={"text_encoder": "clip_l", "text_encoder_2": "clip_g"},
    long_prompts=True)
