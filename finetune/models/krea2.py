"""Krea 2 (krea/Krea-2-Raw): a single-stream MMDiT (`Krea2Transformer2DModel`, 28 blocks 6144 wide, grouped-query
attention 48/12 heads with a sigmoid output gate, SwiGLU) on the Qwen-Image VAE's 16-channel latents packed 2x2,
conditioned by a stack of 12 hidden layers of Qwen3-VL-4B (`Qwen3VLModel`, text only) that the transformer's own
`text_fusion` blocks fuse, trained with flow matching (finetune/models/flow_matching.py).

What the pipeline does, and so what training does (diffusers' Krea2Pipeline; diffusers has no Krea 2 script):
- conditioning is the pipeline's own `encode_prompt`: the caption in Qwen-Image's system template, tokenized as
  `[prefix | caption | PAD... | suffix]` (padded to 512 + 34 - 5 before the 5-token assistant suffix), Qwen3-VL run
  with explicit mRoPE position ids that only real tokens advance, the hidden states at the pipeline's
  `text_encoder_select_layers` stacked per token, the 34 prefix tokens dropped: states [B, 512, 12, 2560] and a bool
  mask [B, 512] with its hole in the middle. Always 512 tokens, so the text cache keeps them as they are and
  `predict` passes them unchanged (31 MB a caption in bf16: the text cache is large);
- latents are 5-D `(B, 16, 1, H, W)`, normalised per channel `(z - latents_mean) / latents_std` (the VAE config's
  lists, as the pipeline's decode inverts), kept 4-D in the loop: the frame axis is squeezed after encoding;
- the transformer reads the pipeline's 2x2-packed tokens `[B, h/2 * w/2, 64]` (Krea2Pipeline's own `_pack_latents`)
  with `position_ids` = `prepare_position_ids` (text rows zero, image rows (0, row, col)), `timestep = sigma` (the
  pipeline's `t / 1000` of the scheduler's sigma x 1000), the mask, and predicts the velocity `noise - x0` as is.
  There is no guidance input: sampling's CFG is `cond + g (cond - uncond)`, g = 4.5 (the usual scale 5.5).

Sigma defaults: `sigmoid` sampling (u = sigmoid(N(0, 1))) shifted by the image's token count as the released RAW
scheduler config shifts what Krea2Pipeline samples: exponentially, mu 0.5 at 256 tokens to 1.15 at 6400
(`use_dynamic_shifting`, `time_shift_type: exponential`; e^mu = 2.5 at 1024 px). That is ai-toolkit's Krea 2
default (dynamic 0.5 -> 1.15 @6400) and musubi-tuner's `krea2_shift` (families-next.md section 10), and it trains
the steps the base samples; diffusers' plain uniform draw on the config's (dynamic, so unshifted) sigmas is not
taken, nor musubi's documented static shift 2.5 (a recipe's `model.flow.shift: 2.5` alone gives it). No weighting.
Train on RAW, not on the distilled Turbo (`is_distilled`, fixed mu 1.15, 8 steps), which loads RAW's LoRAs for
sampling (README_krea2). LoRA targets: SimpleTuner's to_q, to_k, to_v, to_out.0 (as name tails they also catch the
text_fusion blocks' attention, as the authors' set does); `strategy.target_preset: authors`: the authors' full set.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from finetune.models.base import Components, one_frame_moments, unwrapped
from finetune.models.family import Family, FamilySpec, OriginalNames
from finetune.models.flow_matching import FlowMatchingOptions, shifted_as_the_scheduler
from finetune.networks.hypernetwork_points import TextStream
from finetune.recipe.schema import ModelOptions

MAX_SEQUENCE_LENGTH = 512  # Krea2Pipeline's max_sequence_length: text tokens after the dropped prefix
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"  # after the padding; it counts in MAX_SEQUENCE_LENGTH
PACKING = SimpleNamespace(patch_size=2, vae_scale_factor=1)  # Krea2Pipeline's patch_size, on latent sides
BLOCKS = r"(transformer_blocks|text_fusion\.(layerwise|refiner)_blocks)\.\d+\."
ATTENTION = BLOCKS + r"attn\.(to_q|to_k|to_v|to_out\.0|to_gate)"
PRESETS = {
    # the authors' full set (diffusers' Krea 2 docs, rank 32): the attention with its gate, ff.up / ff.down, and
    # the embedders, projections and final layer
    "authors": (ATTENTION, BLOCKS + r"ff\.(up|down)",
                r"img_in|final_layer\.linear|text_fusion\.projector|txt_in\.linear_[12]|time_embed\.linear_[12]"
                r"|time_mod_proj"),
    "attention": (ATTENTION,),  # what the authors narrow to for long runs: to_q, to_k, to_v, to_out.0, to_gate
    "all_linear": (r".+",),  # every Linear (musubi's and ai-toolkit's reach)
}
# the original Krea 2 names (ComfyUI's, ai-toolkit's): diffusers' _convert_non_diffusers_krea2_lora_to_diffusers
BLOCK_NAMES = {"attn.to_q": "attn.wq", "attn.to_k": "attn.wk", "attn.to_v": "attn.wv", "attn.to_out.0": "attn.wo",
               "attn.to_gate": "attn.gate", "ff.gate": "mlp.gate", "ff.up": "mlp.up", "ff.down": "mlp.down"}
LISTS = {"transformer_blocks": "blocks", "text_fusion.layerwise_blocks": "txtfusion.layerwise_blocks",
         "text_fusion.refiner_blocks": "txtfusion.refiner_blocks"}
COMFYUI_NAMES = OriginalNames(
    blocks=LISTS, renamed={listed: BLOCK_NAMES for listed in LISTS},
    top={"img_in": "first", "final_layer.linear": "last.linear", "time_embed.linear_1": "tmlp.0",
         "time_embed.linear_2": "tmlp.2", "time_mod_proj": "tproj.1", "txt_in.linear_1": "txtmlp.1",
         "txt_in.linear_2": "txtmlp.3", "text_fusion.projector": "txtfusion.projector"})


@dataclass
class Krea2Options(ModelOptions, FlowMatchingOptions):
    """`model` for model.family krea2: the common keys and `flow` (no guidance input: Krea 2 has none)."""

    def problems(self) -> list[str]:
        return self.objective_problems()


class Krea2(Family):
    def flow_defaults(self, flow: dict[str, Any], scheduler_config: Any) -> dict[str, Any]:
        """Sigmoid sampling shifted as the base's scheduler shifts (see the module docstring); a static
        `model.flow.shift` alone turns the resolution shift off."""
        return shifted_as_the_scheduler(flow, scheduler_config, "sigmoid")

    def encode_prompts(self, parts: Components, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(tapped states [batch, 512, taps, Qwen3-VL width], mask [batch, 512] bool): the pipeline's
        encode_prompt, which always gives MAX_SEQUENCE_LENGTH tokens."""
        return self.pipeline(parts).encode_prompt(list(captions), device=self.text_device(parts),
                                                  max_sequence_length=MAX_SEQUENCE_LENGTH)

    def caption_window(self, tokenizer: Any, max_token_length: int | None) -> int:
        """The caption tokens that fit in MAX_SEQUENCE_LENGTH beside the suffix."""
        return MAX_SEQUENCE_LENGTH - len(tokenizer(SUFFIX).input_ids)

    def encode_image_moments(self, parts: Components, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's latent distribution (mean, std) [B, C, h, w]: the images as one-frame videos."""
        return one_frame_moments(parts.vae, pixels)

    def predict(self, parts: Components, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: tuple[torch.Tensor, torch.Tensor], conditions: dict[str, torch.Tensor]
                ) -> torch.Tensor:
        """The velocity [B, C, h, w] for `noisy` latents [B, C, h, w] at sigmas `timesteps` [B] in (0, 1): the
        transformer called as Krea2Pipeline's denoising loop calls it (see the module docstring)."""
        from diffusers import Krea2Pipeline

        states, mask = conditioning
        transformer = parts.transformer
        dtype = unwrapped(transformer).dtype
        batch, channels, height, width = noisy.shape
        if height % 2 or width % 2:
            raise ValueError(f"Krea 2 packs latents in 2x2 patches; a {height}x{width} latent cannot be packed: use "
                             "image sides (and bucket sides) that are multiples of 16 px")
        device = noisy.device
        tokens = transformer(
            hidden_states=Krea2Pipeline._pack_latents(PACKING, noisy.to(dtype), batch, channels, height, width),
            encoder_hidden_states=states.to(device, dtype),
            timestep=(timesteps.float() * 1000 / 1000).to(dtype),  # the pipeline's t / 1000, t = sigma x 1000
            position_ids=Krea2Pipeline.prepare_position_ids(states.shape[1], height // 2, width // 2, device),
            encoder_attention_mask=mask.to(device).bool(), return_dict=False)[0]
        return Krea2Pipeline._unpack_latents(PACKING, tokens, height, width).squeeze(2)


def build_tiny(seed: int = 0) -> Any:
    """A Krea2Pipeline in miniature: the character-level Qwen tokenizer with the template's words added as tokens
    (prefix 34 tokens, suffix 5, as the real one's) and the VL special tokens; a Qwen3-VL of 3 text layers 16 wide
    (M-RoPE sections 2+1+1 of head_dim 8; bos/eos/pad inside the vocab) with a 1-block vision tower, tapped at
    layers 1, 2, 3; the transformer 2 blocks of 4 heads of 8 (2 kv heads; RoPE axes 4+2+2), one layer-wise and one
    refiner text block, on 4-channel latents packed 2x2; the Qwen VAE 8x down (z_dim 4, mean 0.1 / std 1.5); the
    released scheduler config. 32 px: 4x4 latents, 4 tokens."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, Krea2Pipeline,
                           Krea2Transformer2DModel)
    from transformers import Qwen3VLConfig, Qwen3VLModel

    from finetune.models.tiny_transformers import build_qwen_vl_tokenizer, qwen_vl_config

    torch.manual_seed(seed)
    tokenizer = build_qwen_vl_tokenizer(
        "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
        "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n" + SUFFIX)
    text_encoder = Qwen3VLModel(qwen_vl_config(
        tokenizer, Qwen3VLConfig, dict(num_hidden_layers=3, head_dim=8, rope_parameters={
            "rope_type": "default", "rope_theta": 5e6, "mrope_section": [2, 1, 1], "mrope_interleaved": True}),
        dict(num_position_embeddings=64, deepstack_visual_indexes=[])))
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                 temperal_downsample=[False, True, True], latents_mean=[0.1] * 4,
                                 latents_std=[1.5] * 4)
    transformer = Krea2Transformer2DModel(
        in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=32, timestep_embed_dim=8, text_hidden_dim=16, num_text_layers=3, text_num_attention_heads=2,
        text_num_key_value_heads=1, text_intermediate_size=16, num_layerwise_text_blocks=1, num_refiner_text_blocks=1,
        axes_dims_rope=(4, 2, 2))
    scheduler = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=6400,
                                                max_shift=1.15, shift=1.0, use_dynamic_shifting=True,
                                                time_shift_type="exponential")
    pipe = Krea2Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         transformer=transformer, text_encoder_select_layers=(1, 2, 3))
    for part in (text_encoder, transformer, vae):
        part.eval()
    return pipe


SPEC = FamilySpec(
    name="krea2", title="Krea 2", pipeline="Krea2Pipeline", objective="flow_matching",
    objective_defaults=(
        "sigmoid(N(0, 1)) shifted by the image's token count with the RAW base scheduler's exponential constants "
        "(mu 0.5 at 256 tokens to 1.15 at 6400: e^mu 2.5 at 1024 px), no weighting: ai-toolkit's dynamic shift, "
        "musubi-tuner's krea2_shift and how Krea2Pipeline samples RAW (train on RAW, validate on Turbo)"),
    options=Krea2Options, behaviour=Krea2, tiny=build_tiny,
    # the pipeline's own settings: which Qwen3-VL layers are tapped, Turbo's fixed shift, packing
    pipeline_settings=("text_encoder_select_layers", "is_distilled", "patch_size"),
    single_file_keys=("blocks.", "txtfusion.", "tproj."),  # the original Krea 2 names
    lora_targets=("to_q", "to_k", "to_v", "to_out.0"),
    lora_target_presets=PRESETS,
    text_encoder_lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),  # Qwen3-VL's language model attention
    adapted_text_encoders=("text_encoder",),
    # the text_fusion refiner blocks attend over the caption tokens alone (to_k / to_v of text only), before the
    # single-stream blocks, as Z-Image's context_refiner
    hypernetwork_text_stream=TextStream(layers="text_fusion.refiner_blocks.", keys="to_k", values="to_v"),
    refuses={"textual_inversion": "its text encoder is Qwen3-VL, its diffusers pipeline has no embedding loader and "
                                  "no embedding file layout is defined for it",
             # Krea2LoraLoaderMixin's _lora_loadable_modules is ["transformer"]
             "lora.text_encoder": "Krea2Pipeline.load_lora_weights loads the transformer's layers only: a Qwen3-VL "
                                  "LoRA would not load in diffusers"},
    kohya_prefixes={"transformer": "lora_unet"},
    kohya_unet_layout="none",
    kohya_base_model_version="krea2",
    comfyui_names=COMFYUI_NAMES)
