"""Qwen-Image: a double-stream MMDiT (`QwenImageTransformer2DModel`, 60 blocks 3072 wide) on 16-channel latents of
the Wan-type causal VAE (`AutoencoderKLQwenImage`), packed 2x2, conditioned by Qwen2.5-VL-7B's last hidden states
(`text_encoder`, used for text only), trained with flow matching (finetune/models/flow_matching.py).

What differs from Flux.1 (diffusers' QwenImagePipeline and train_dreambooth_lora_qwen_image.py):
- conditioning is the pipeline's own `encode_prompt`: the caption in Qwen-Image's system template, the last hidden
  state, the template's first 34 tokens dropped, right-padded to the batch's longest with a mask (None when nothing
  is padded). `encode_prompts` pads every caption to MAX_SEQUENCE_LENGTH (the pipeline's and script's 512) with its
  mask, so the cache keeps one length; `predict` cuts the batch back to its longest caption and drops an all-ones
  mask, which is what encode_prompt gives the transformer for that batch;
- latents are 5-D `(B, 16, 1, H, W)`, normalised per channel, `(z - latents_mean) / latents_std` (the VAE config's
  lists; the script's, and the inverse of the pipeline's decode). The loop keeps them 4-D: the frame axis is
  squeezed after encoding and packing adds it back (`_unpack_latents` returns it);
- the transformer reads 2x2-packed tokens `[B, h/2 * w/2, 64]` with `img_shapes = [[(1, h/2, w/2)]] * B` (only the
  first item's is read: a batch shares one size, as bucketing batches), `timestep = sigma` (the pipeline's
  `t / 1000`), no guidance (the released transformer has no guidance embedding; true CFG is sampling's), and
  predicts the velocity `noise - x0` as is.

Sigma defaults: `sigmoid` sampling (u = sigmoid(N(0, 1))) shifted by the image's token count with the base's
scheduler constants, exponentially (the released config: `use_dynamic_shifting`, `time_shift_type: exponential`,
mu 0.5 at 256 tokens to 0.9 at 8192): musubi-tuner's `--timestep_sampling qwen_shift`, and how QwenImagePipeline
samples. That is e^mu = 2.0 at 1024 px and 2.3 at 1328 px, beside musubi's documented static
`--discrete_flow_shift 2.2` (its `shift` sampling) for 1328 px, and smaller images get the smaller shift they are
sampled with. diffusers' script draws u uniformly from its scheduler, whose dynamic shifting leaves it unshifted:
not chosen, since it trains steps the sampler rarely visits. A recipe's `model.flow.shift` alone replaces the
resolution shift by that static one (musubi's `shift`). No loss weighting (every peer's default).
LoRA targets: diffusers' and SimpleTuner's default, the image stream's to_q, to_k, to_v, to_out.0; presets below.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from finetune.models.base import Components, one_frame_moments, unwrapped
from finetune.models.family import Family, FamilySpec, OriginalNames
from finetune.models.flow_matching import FlowMatchingOptions, shifted_as_the_scheduler
from finetune.networks.hypernetwork_points import TextStream
from finetune.recipe.schema import ModelOptions

# caption tokens after the dropped template prefix, in training and in sample grids: QwenImagePipeline.__call__'s
# default max_sequence_length and the diffusers script's
MAX_SEQUENCE_LENGTH = 512
# what the template puts after the caption (kept by encode_prompt: it counts in MAX_SEQUENCE_LENGTH)
TEMPLATE_END = "<|im_end|>\n<|im_start|>assistant\n"
ATTENTION = r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
PRESETS = {
    "attention": (ATTENTION,),  # both streams' attention projections
    # OneTrainer's "attn-mlp" (attn, img_mlp, txt_mlp): musubi's networks/lora_qwen_image.py default too, every
    # Linear of QwenImageTransformerBlock but the modulations (img_mod, txt_mod)
    "attn-mlp": (ATTENTION, r"transformer_blocks\.\d+\.(img_mlp|txt_mlp)\.net\.(0\.proj|2)"),
    # every Linear of the blocks, the modulations included
    "all_linear": (r"transformer_blocks\.\d+\..+",),
}


@dataclass
class QwenImageOptions(ModelOptions, FlowMatchingOptions):
    """`model` for model.family qwen_image: the common keys and `flow`."""

    def problems(self) -> list[str]:
        return self.objective_problems()


class QwenImage(Family):
    def flow_defaults(self, flow: dict[str, Any], scheduler_config: Any) -> dict[str, Any]:
        """Sigmoid sampling shifted by the token count as the base's scheduler shifts (see the module docstring);
        a static `model.flow.shift` alone turns the resolution shift off."""
        return shifted_as_the_scheduler(flow, scheduler_config, "sigmoid", always_dynamic=True)

    def encode_prompts(self, parts: Components, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(states [batch, MAX_SEQUENCE_LENGTH, Qwen2.5-VL width], mask [batch, MAX_SEQUENCE_LENGTH] bool): the
        pipeline's encode_prompt, padded with zeros from the batch's longest caption to MAX_SEQUENCE_LENGTH."""
        device = self.text_device(parts)
        states, mask = self.pipeline(parts).encode_prompt(list(captions), device=device,
                                                          max_sequence_length=MAX_SEQUENCE_LENGTH)
        if mask is None:  # nothing padded
            mask = torch.ones(states.shape[:2], dtype=torch.long, device=states.device)
        missing = MAX_SEQUENCE_LENGTH - states.shape[1]
        return (torch.nn.functional.pad(states, (0, 0, 0, missing)),
                torch.nn.functional.pad(mask, (0, missing)).bool())

    def caption_window(self, tokenizer: Any, max_token_length: int | None) -> int:
        """The caption tokens that fit in MAX_SEQUENCE_LENGTH beside the template's end."""
        return MAX_SEQUENCE_LENGTH - len(tokenizer(TEMPLATE_END).input_ids)

    def encode_image_moments(self, parts: Components, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's latent distribution (mean, std) [B, C, h, w]: the images as one-frame videos."""
        return one_frame_moments(parts.vae, pixels)

    def predict(self, parts: Components, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: tuple[torch.Tensor, torch.Tensor], conditions: dict[str, torch.Tensor]
                ) -> torch.Tensor:
        """The velocity [B, C, h, w] for `noisy` latents [B, C, h, w] at sigmas `timesteps` [B] in (0, 1): packed
        into tokens and run with the text, mask and img_shapes QwenImagePipeline's denoising loop gives, unpacked."""
        from diffusers import QwenImagePipeline

        states, mask = conditioning
        transformer = parts.transformer
        dtype = unwrapped(transformer).dtype
        batch, channels, height, width = noisy.shape
        if height % 2 or width % 2:
            raise ValueError(f"Qwen-Image packs latents in 2x2 patches; a {height}x{width} latent cannot be packed: "
                             "use image sides (and bucket sides) that are multiples of 16 px")
        keep = int(mask.sum(dim=1).max())  # encode_prompt's length for this batch: its longest caption
        states, mask = states[:, :keep].to(dtype), mask[:, :keep].long()
        tokens = transformer(
            hidden_states=QwenImagePipeline._pack_latents(noisy.to(dtype), batch, channels, height, width),
            timestep=timesteps.to(dtype), guidance=None, encoder_hidden_states_mask=None if mask.all() else mask,
            encoder_hidden_states=states, img_shapes=[[(1, height // 2, width // 2)]] * batch, return_dict=False)[0]
        return QwenImagePipeline._unpack_latents(tokens, height, width, 1).squeeze(2)


def build_tiny(seed: int = 0) -> Any:
    """A QwenImagePipeline in miniature: the character-level Qwen tokenizer with the template's words added as
    tokens, so that its prefix is 34 tokens as the real one's (encode_prompt drops 34) and the VL special tokens; a
    Qwen2.5-VL of 2 text layers 16 wide (M-RoPE sections 1+1+2 of head_dim 8; bos/eos/pad inside the vocab) with a
    1-block vision tower; the transformer 2 blocks of 2 heads of 16 (RoPE axes 8+4+4) on 4-channel latents packed
    2x2; the Qwen VAE 8x down (z_dim 4, mean 0.1 / std 1.5 per channel); the released scheduler config but its
    shift_terminal (0.02), which makes a 1-step schedule NaN. 32 px: 4x4 latents, 4 tokens."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from finetune.models.tiny_transformers import build_qwen_vl_tokenizer, qwen_vl_config

    torch.manual_seed(seed)
    tokenizer = build_qwen_vl_tokenizer(
        "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
        "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n")
    text_encoder = Qwen2_5_VLForConditionalGeneration(qwen_vl_config(
        tokenizer, Qwen2_5_VLConfig, dict(num_hidden_layers=2, rope_parameters={
            "rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]}),
        dict(fullatt_block_indexes=[0])))
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                 temperal_downsample=[False, True, True], latents_mean=[0.1] * 4,
                                 latents_std=[1.5] * 4)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                              axes_dims_rope=(8, 4, 4))
    scheduler = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192,
                                                max_shift=0.9, shift=1.0, use_dynamic_shifting=True,
                                                time_shift_type="exponential")
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)
    for part in (text_encoder, transformer, vae):
        part.eval()
    return pipe


SPEC = FamilySpec(
    name="qwen_image", title="Qwen-Image", pipeline="QwenImagePipeline", objective="flow_matching",
    objective_defaults=(
        "sigmoid(N(0, 1)) shifted by the image's token count with the base scheduler's exponential constants (mu "
        "0.5 at 256 tokens to 0.9 at 8192: e^mu 2.0 at 1024 px, 2.3 at 1328 px), no weighting: musubi-tuner's "
        "qwen_shift and how QwenImagePipeline samples (diffusers' script trains unshifted sigmas)"),
    options=QwenImageOptions, behaviour=QwenImage, tiny=build_tiny,
    single_file_keys=("img_in.", "txt_norm.", "transformer_blocks."),  # the original (= diffusers) names
    lora_targets=("to_q", "to_k", "to_v", "to_out.0"),
    lora_target_presets=PRESETS,
    text_encoder_lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),  # Qwen2.5-VL's language model attention
    # the double-stream blocks' text keys and values: QwenDoubleStreamAttnProcessor2_0's add_k_proj / add_v_proj
    # on encoder_hidden_states alone, before the joint attention
    hypernetwork_text_stream=TextStream(layers="transformer_blocks.", keys="add_k_proj", values="add_v_proj"),
    refuses={"textual_inversion": "its text encoder is Qwen2.5-VL, its diffusers pipeline has no embedding loader "
                                  "and no embedding file layout is defined for it"},
    kohya_prefixes={"transformer": "lora_unet"},  # musubi's lora_unet_transformer_blocks_0_attn_to_q
    kohya_unet_layout="none",
    kohya_base_model_version="qwen_image",
    kohya_network_module="networks.lora_qwen_image",  # musubi-tuner's Qwen-Image trainer
    modelspec_architecture="Qwen-Image",  # musubi-tuner's sai_model_spec (+ "/lora")
    modelspec_implementation="https://github.com/QwenLM/Qwen-Image",
    # ComfyUI's (and the original code's) module names are diffusers', under diffusion_model.
    comfyui_names=OriginalNames())
