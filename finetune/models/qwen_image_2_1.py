"""Qwen-Image 2.1 (Qwen/Qwen-Image-2.1): a single-stream, block-causal transformer (`QwenImage21Transformer2DModel`,
32 blocks 4096 wide, one shared modulation) on the unpacked 64-channel latents of a 16x RGBA VAE
(`AutoencoderKLQwenImage21`), conditioned by Qwen3-VL (`Qwen3VLForConditionalGeneration` through its
`Qwen3VLProcessor`), trained with flow matching (finetune/models/flow_matching.py). Text-to-image only: condition
images (edits) are not trained here.

What the pipeline does, and so what training does (diffusers' QwenImage21Pipeline; no diffusers script or peer
trainer trains 2.1 yet):
- conditioning is the pipeline's own `encode_prompt` for a text-only prompt: the caption in the 2.1 system template
  through the processor (left padding), the last decoder layer's state BEFORE Qwen3-VL's final norm (the pipeline's
  hook), the system tokens dropped, right-padded to the batch's longest with a mask (None when nothing is padded).
  The pipeline sets no length limit; the cache keeps MAX_SEQUENCE_LENGTH tokens (Qwen-Image's 512) with the mask,
  and `predict` cuts a batch back to its longest caption (an all-ones mask dropped), as encode_prompt gives it;
- latents: the loop's RGB pixels get an opaque alpha channel (what the pipeline's RGBA conversion gives an RGB
  image), are encoded as one-frame videos and normalised per channel, `(z - latents_mean) / latents_std` (the VAE
  config's lists, as the pipeline's `_encode_vae_image`; drawn from the latent distribution as Qwen-Image's
  training draws, where the pipeline takes the mode of a condition image). Kept 4-D `[B, 64, h, w]`, no 2x2 packing;
- the transformer reads the latents flattened to tokens `[B, h*w, 64]` after the text, `img_shapes [[(1, h, w)]]`,
  `img_mask` marking one slot per 2x2 group of target tokens after the (image-free) text, `timestep = sigma` (the
  pipeline's `t / 1000`; text rows modulate at t = 0 inside), no guidance; the last h*w output tokens are the
  velocity `noise - x0`, as the pipeline steps with it. Latent sides must be even (image sides multiples of 32 px).

Sigma defaults: no peer trains 2.1, so the pipeline's own schedule: `sigmoid` sampling (u = sigmoid(N(0, 1)), the
Qwen-Image file's default) shifted by the image's token count (h*w: nothing packed) with the base scheduler's
constants, as QwenImage21Pipeline's `calculate_shift` shifts its sigmas; a recipe's static `model.flow.shift`
alone replaces it. No loss weighting (every peer's default for Qwen-Image).
LoRA targets: diffusers' and the peers' Qwen-Image set, to_q, to_k, to_v, to_out.0 (2.1's single stream has them).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from finetune.models.base import Components, one_frame_moments, unwrapped
from finetune.models.family import Family, FamilySpec
from finetune.models.flow_matching import FlowMatchingOptions, shifted_as_the_scheduler
from finetune.recipe.schema import ModelOptions

MAX_SEQUENCE_LENGTH = 512  # text tokens kept after the dropped system prompt (Qwen-Image's 512)
USER, END = "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"  # kept around the caption
ATTENTION = r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)"
PRESETS = {"attention": (ATTENTION,),
           "attn-mlp": (ATTENTION, r"transformer_blocks\.\d+\.img_mlp\.(proj|gate_layer|out)"),
           "all_linear": (r"transformer_blocks\.\d+\..+",)}  # the blocks hold no modulation of their own
# the processor's chat template, enough of it for the system message the pipeline counts
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
        "{% else %}{% for c in m['content'] %}{{ c['text'] }}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@dataclass
class QwenImage21Options(ModelOptions, FlowMatchingOptions):
    """`model` for model.family qwen_image_2_1: the common keys and `flow` (no guidance input)."""

    def problems(self) -> list[str]:
        return self.objective_problems()


class QwenImage21(Family):
    def objective(self, parts: Components, options: Any = None) -> Any:
        """The shared objective, its resolution shift counting h*w tokens (2.1 packs nothing)."""
        objective = super().objective(parts, options)
        shift = objective.resolution_shift
        return objective if shift is None else dataclasses.replace(
            objective, resolution_shift=dataclasses.replace(shift, patch=1))

    def flow_defaults(self, flow: dict[str, Any], scheduler_config: Any) -> dict[str, Any]:
        """Sigmoid sampling shifted by the token count as the pipeline shifts; a static `model.flow.shift` alone
        turns the resolution shift off."""
        return shifted_as_the_scheduler(flow, scheduler_config, "sigmoid", always_dynamic=True)

    def text_encoders(self, parts: Components) -> list[tuple[str, Any, Any]]:
        return [("text_encoder", parts.tokenizers["processor"].tokenizer, unwrapped(parts.modules["text_encoder"]))]

    def tokenizer_of(self, base: str) -> Any | None:
        """The processor's tokenizer from a diffusers folder (`processor/`), without the models."""
        import os

        from transformers import AutoTokenizer

        folder = os.path.join(os.path.expanduser(base), "processor")
        return AutoTokenizer.from_pretrained(folder) if os.path.isdir(folder) else None

    def encode_prompts(self, parts: Components, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(states [batch, MAX_SEQUENCE_LENGTH, Qwen3-VL width], mask [batch, MAX_SEQUENCE_LENGTH] bool): the
        pipeline's encode_prompt, cut at or padded with zeros to MAX_SEQUENCE_LENGTH."""
        states, mask, _ = self.pipeline(parts).encode_prompt(list(captions), device=self.text_device(parts))
        if mask is None:  # nothing padded
            mask = torch.ones(states.shape[:2], dtype=torch.long, device=states.device)
        states, mask = states[:, :MAX_SEQUENCE_LENGTH], mask[:, :MAX_SEQUENCE_LENGTH]
        missing = MAX_SEQUENCE_LENGTH - states.shape[1]
        return (torch.nn.functional.pad(states, (0, 0, 0, missing)),
                torch.nn.functional.pad(mask, (0, missing)).bool())

    def caption_window(self, tokenizer: Any, max_token_length: int | None) -> int:
        """The caption tokens that fit in MAX_SEQUENCE_LENGTH beside the user and assistant markers."""
        return MAX_SEQUENCE_LENGTH - len(tokenizer(USER + END).input_ids)

    def encode_image_moments(self, parts: Components, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's latent distribution (mean, std) [B, C, h, w] of the RGB pixels made opaque RGBA (alpha 1.0: an
        RGB image as the pipeline's RGBA conversion gives it), each a one-frame video."""
        return one_frame_moments(parts.vae, torch.cat([pixels, torch.ones_like(pixels[:, :1])], dim=1))

    def predict(self, parts: Components, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: tuple[torch.Tensor, torch.Tensor], conditions: dict[str, torch.Tensor]
                ) -> torch.Tensor:
        """The velocity [B, C, h, w] for `noisy` latents [B, C, h, w] at sigmas `timesteps` [B] in (0, 1): the
        transformer called as QwenImage21Pipeline's denoising loop calls it (see the module docstring)."""
        states, mask = conditioning
        transformer = parts.transformer
        dtype = unwrapped(transformer).dtype
        batch, channels, height, width = noisy.shape
        if height % 2 or width % 2:
            raise ValueError(f"Qwen-Image 2.1 reads a {height}x{width} latent in 2x2 groups: use image sides (and "
                             "bucket sides) that are multiples of 32 px")
        device = noisy.device
        keep = int(mask.sum(dim=1).max())  # encode_prompt's length for this batch: its longest caption
        states, mask = states[:, :keep].to(device, dtype), mask[:, :keep].to(device).long()
        slots = torch.ones(batch, height * width // 4, dtype=torch.bool, device=device)  # one per 2x2 target group
        tokens = transformer(
            hidden_states=noisy.to(dtype).reshape(batch, channels, height * width).transpose(1, 2),
            timestep=(timesteps.float() * 1000).to(dtype) / 1000,  # the pipeline's t / 1000, t = sigma x 1000
            encoder_hidden_states=states, encoder_hidden_states_mask=None if mask.all() else mask,
            img_shapes=[[(1, height, width)]] * batch,
            img_mask=torch.cat([torch.zeros(batch, keep, dtype=torch.bool, device=device), slots], dim=1),
            return_dict=False)[0]
        return tokens[:, -height * width:].transpose(1, 2).reshape(batch, channels, height, width)


def build_tiny(seed: int = 0) -> Any:
    """A QwenImage21Pipeline in miniature: a Qwen3VLProcessor (the character-level Qwen tokenizer with the
    templates' words added as tokens and the VL special tokens; 16 px patches) over a Qwen3-VL of 2 text layers 16
    wide (M-RoPE sections 2+1+1 of head_dim 8) with a 1-block vision tower; the transformer 2 blocks of 2 heads of
    16 (RoPE axes 4+6+6) on 4-channel latents; the 2.1 VAE 16x down (RGBA in, z_dim 4, mean 0.1 / std 1.5); Qwen-Image's
    released scheduler config but its shift_terminal (a 1-step schedule is NaN with it). 32 px: 2x2 latents."""
    from diffusers import (AutoencoderKLQwenImage21, FlowMatchEulerDiscreteScheduler, QwenImage21Pipeline,
                           QwenImage21Transformer2DModel)
    from transformers import (Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                              Qwen3VLProcessor, Qwen3VLVideoProcessor)

    from finetune.models.tiny_transformers import build_qwen_vl_tokenizer, qwen_vl_config

    torch.manual_seed(seed)
    tokenizer = build_qwen_vl_tokenizer("system Comprehend and analyze the provided prompt user assistant")
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2,
                                              min_pixels=32 ** 2, max_pixels=128 ** 2),
        tokenizer=tokenizer, video_processor=Qwen3VLVideoProcessor(patch_size=16), chat_template=CHAT)
    text_encoder = Qwen3VLForConditionalGeneration(qwen_vl_config(
        tokenizer, Qwen3VLConfig, dict(num_hidden_layers=2, head_dim=8, rope_parameters={
            "rope_type": "default", "rope_theta": 5e6, "mrope_section": [2, 1, 1], "mrope_interleaved": True}),
        dict(num_position_embeddings=64, deepstack_visual_indexes=[])))
    vae = AutoencoderKLQwenImage21(base_dim=8, decoder_base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1, 1],
                                   num_res_blocks=1, temperal_downsample=[False, True, True, True],
                                   latents_mean=[0.1] * 4, latents_std=[1.5] * 4)
    transformer = QwenImage21Transformer2DModel(in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
                                                num_attention_heads=2, context_in_dim=16, axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192,
                                                max_shift=0.9, shift=1.0, use_dynamic_shifting=True,
                                                time_shift_type="exponential")
    pipe = QwenImage21Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, processor=processor,
                               transformer=transformer)
    for part in (text_encoder, transformer, vae):
        part.eval()
    return pipe


SPEC = FamilySpec(
    name="qwen_image_2_1", title="Qwen-Image 2.1", pipeline="QwenImage21Pipeline", objective="flow_matching",
    objective_defaults=(
        "sigmoid(N(0, 1)) shifted by the image's h x w latent tokens (nothing packed) with the base scheduler's "
        "constants and time_shift_type, no weighting: how QwenImage21Pipeline shifts its sigmas (calculate_shift) and the "
        "Qwen-Image default; no peer trains 2.1 yet"),
    options=QwenImage21Options, behaviour=QwenImage21, tiny=build_tiny,
    # the original (= diffusers) names: a shared `modulation` and txt_in's text_norm, which Qwen-Image lacks
    single_file_keys=("img_in.", "txt_in.text_norm.", "modulation.", "transformer_blocks."),
    lora_targets=("to_q", "to_k", "to_v", "to_out.0"),
    lora_target_presets=PRESETS,
    text_encoder_lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),  # Qwen3-VL's language model attention
    adapted_text_encoders=("text_encoder",),
    refuses={"textual_inversion": "its text encoder is Qwen3-VL, its diffusers pipeline has no embedding loader and "
                                  "no embedding file layout is defined for it",
             # QwenImageLoraLoaderMixin's _lora_loadable_modules is ["transformer"]
             "lora.text_encoder": "QwenImage21Pipeline.load_lora_weights loads the transformer's layers only: a "
                                  "Qwen3-VL LoRA would not load in diffusers",
             "hypernetwork": "its single-stream blocks compute keys and values from the joint text and image "
                             "sequence: no attention reads the text alone"},
    kohya_prefixes={"transformer": "lora_unet"},
    kohya_unet_layout="none",
    kohya_base_model_version="qwen_image_2_1",
    needs={"torchvision": "Qwen3VLProcessor, the pipeline's processor, needs a video processor"},
    comfyui_names=None)  # ComfyUI's 2.1 module names (its fused img_mlp.gate_up) could not be checked here
