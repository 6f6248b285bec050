"""Chroma (lodestones/Chroma1-Base, -HD): Flux.1-schnell's double- and single-stream transformer
(`ChromaTransformer2DModel`, 19 + 38 blocks) with no CLIP, no pooled vector and no guidance input: one small MLP,
the `distilled_guidance_layer`, maps the timestep to every block's modulation. Conditioned by T5-XXL alone
(`text_encoder`), on Flux's 16-channel latents packed 2x2, trained with flow matching (flow_matching.py).

What the pipeline does, and so what training does (diffusers' ChromaPipeline; it has no training script):
- conditioning is the pipeline's own `encode_prompt`: T5 reads 512 tokens under the tokenizer's plain mask, and
  returns the transformer's mask, which keeps every real token plus one pad (`mask_indices <= seq_len`, diffusers
  PR #12508; sd-scripts #2163 and SimpleTuner mask the same tokens). `encode_prompts` returns (states, that mask);
  `predict` appends ones for the image tokens (`_prepare_attention_mask`), as the denoising loop does. The mask
  goes in exactly as the pipeline gives it, a float 0/1 tensor, which SDPA adds to the scores rather than
  treating as keep/drop (diffusers #12116, #13619; SimpleTuner casts it to bool): training matches what
  ChromaPipeline samples with, pads included, and moves with diffusers when it is fixed there;
- latents [B, 16, h, w] are packed into [B, h/2 * w/2, 64] with ids (0, row, col), text ids zeros, and the
  transformer is called with `timestep = sigma` (the pipeline's `t / 1000` of the scheduler's `sigma x 1000`, in
  the transformer's dtype; x1000 inside); its output is the velocity `noise - x0`, unpacked back;
- Flux's VAE: `(z - 0.1159) x 0.3611` from its config.

Sigma defaults: `sigmoid` sampling (u = sigmoid(N(0, 1)), SimpleTuner's and ai-toolkit's default) shifted as the
base's scheduler config shifts what ChromaPipeline samples: by the image's token count (Flux.1's
`calculate_shift`, mu 0.5 at 256 tokens to 1.15 at 4096) with `use_dynamic_shifting`, else the config's static
shift. SimpleTuner's extra remap (`sigma^2` below 0.5, `1 - (1 - sigma)^2` above) is not taken: no peer's pipeline
samples with it, and it would be a new shared sampling option for one family; `model.flow` can still choose.
LoRA targets: SimpleTuner's default, to_q/to_k/to_v/to_out.0 (the single blocks' q/k/v included; its `to_qkv`
names no diffusers module); `strategy.target_preset` names OneTrainer's and kohya's sets.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from finetune.models.device_constants import on_device
from finetune.models.base import Components, unwrapped
from finetune.models.family import Family, FamilySpec, OriginalNames
from finetune.models.flow_matching import FlowMatchingOptions, shifted_as_the_scheduler
from finetune.networks.hypernetwork_points import TextStream
from finetune.recipe.schema import ModelOptions

# T5 tokens per caption, in training and in sample grids: ChromaPipeline's default max_sequence_length
MAX_SEQUENCE_LENGTH = 512
APPROXIMATOR_LAYERS = 5  # Chroma1's distilled_guidance_layer depth (the diffusers config's approximator_layers)
BLOCKS = r"(single_)?transformer_blocks\.\d+\."

PRESETS = {
    # SimpleTuner's flux_lora_target "all": both streams' attention projections (single blocks: q/k/v)
    "attention": (BLOCKS + r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)",),
    # OneTrainer's Chroma default `attn, ff.net, proj_mlp`: every attention projection, the image stream's MLP
    # (its `ff.net` does not catch ff_context.net) and the single blocks' proj_mlp
    "attention_mlp": (BLOCKS + r"attn\..+", r"transformer_blocks\.\d+\.ff\.net\..+",
                      r"single_transformer_blocks\.\d+\.proj_mlp"),
    # kohya-style (sd-scripts' lora_flux, musubi): every Linear of the double and single blocks (Chroma's blocks
    # have no modulation Linear: the approximator outside them makes it)
    "all_linear": (BLOCKS + r".+",),
}

# BFL's names (ComfyUI's and the original checkpoint's), from diffusers' convert_chroma_transformer_checkpoint
COMFYUI_NAMES = OriginalNames(
    blocks={"transformer_blocks": "double_blocks", "single_transformer_blocks": "single_blocks"},
    renamed={"transformer_blocks": {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
                                    "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
                                    "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"},
             "single_transformer_blocks": {"proj_out": "linear2"}},
    # the modules BFL fuses, each with its diffusers members in the order their outputs are stacked
    fused={"transformer_blocks": {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                                  "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")},
           "single_transformer_blocks": {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}},
    widths={"proj_mlp": 4},  # the single blocks' MLP input is 4x the inner width (mlp_ratio)
    top={"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
         "distilled_guidance_layer.in_proj": "distilled_guidance_layer.in_proj",
         "distilled_guidance_layer.out_proj": "distilled_guidance_layer.out_proj",
         **{f"distilled_guidance_layer.layers.{i}.linear_{n}": f"distilled_guidance_layer.layers.{i}.{layer}"
            for i in range(APPROXIMATOR_LAYERS) for n, layer in ((1, "in_layer"), (2, "out_layer"))}})


@dataclass
class ChromaOptions(ModelOptions, FlowMatchingOptions):
    """`model` for model.family chroma: the common keys and `flow` (no guidance input: Chroma has none)."""

    def problems(self) -> list[str]:
        return self.objective_problems()


class Chroma(Family):
    def flow_defaults(self, flow: dict[str, Any], scheduler_config: Any) -> dict[str, Any]:
        """Sigmoid sampling shifted as the base's scheduler shifts (see the module docstring); a static
        `model.flow.shift` alone turns the resolution shift off."""
        return shifted_as_the_scheduler(flow, scheduler_config, "sigmoid")

    def encode_prompts(self, parts: Components, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(T5 states [batch, 512, T5 width], the transformer's text mask [batch, 512]: real tokens and the first
        pad) from the pipeline's encode_prompt; its text_ids (zeros) are rebuilt by predict."""
        states, _, mask, *_ = self.pipeline(parts).encode_prompt(
            list(captions), device=self.text_device(parts), do_classifier_free_guidance=False,
            max_sequence_length=MAX_SEQUENCE_LENGTH)
        return states, mask

    def caption_window(self, tokenizer: Any, max_token_length: int | None) -> int:
        """The caption tokens T5 reads: MAX_SEQUENCE_LENGTH less its end token."""
        return MAX_SEQUENCE_LENGTH - 1

    def predict(self, parts: Components, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: tuple[torch.Tensor, torch.Tensor], conditions: dict[str, torch.Tensor]
                ) -> torch.Tensor:
        """The velocity [B, C, h, w] for `noisy` latents [B, C, h, w] at sigmas `timesteps` [B] in (0, 1): the
        transformer called as ChromaPipeline's denoising loop calls it (see the module docstring)."""
        from diffusers import ChromaPipeline

        states, mask = conditioning
        transformer = parts.transformer
        dtype = unwrapped(transformer).dtype
        batch, channels, height, width = noisy.shape
        if height % 2 or width % 2:
            raise ValueError(f"Chroma packs latents in 2x2 patches; a {height}x{width} latent cannot be packed: "
                             "use image sides (and bucket sides) that are multiples of 16 px")
        tokens = (height // 2) * (width // 2)
        device = noisy.device
        out = transformer(
            hidden_states=ChromaPipeline._pack_latents(noisy.to(dtype), batch, channels, height, width),
            timestep=(timesteps * 1000).to(dtype) / 1000, encoder_hidden_states=states.to(dtype),
            txt_ids=torch.zeros(states.shape[1], 3, device=device, dtype=dtype),
            img_ids=on_device(("chroma image ids", height, width), lambda: ChromaPipeline._prepare_latent_image_ids(
                batch, height // 2, width // 2, "cpu", torch.float32), device, dtype),
            attention_mask=torch.cat([mask.to(device, dtype), torch.ones(batch, tokens, device=device,
                                                                         dtype=torch.bool)], dim=1),
            return_dict=False)[0]
        return ChromaPipeline._unpack_latents(out, height, width, 1)


def build_tiny(seed: int = 0) -> Any:
    """A ChromaPipeline in miniature: T5 32 wide, one double- and one single-stream block (2 heads of 16, RoPE
    axes 4 + 4 + 8) with a one-layer approximator, on Flux's VAE (4 channels here, packed 2x2 into 16); Flux's
    scheduler config (shifted by the token count); 32 px."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    from finetune.models.tiny_transformers import _t5, _vae, build_t5_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_t5_tokenizer()
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8), approximator_num_channels=16,
        approximator_hidden_dim=32, approximator_layers=1)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return ChromaPipeline(scheduler=scheduler, vae=_vae(shift_factor=0.1159, scaling_factor=0.3611),
                          text_encoder=_t5(tokenizer, 32), tokenizer=tokenizer, transformer=transformer)


SPEC = FamilySpec(
    name="chroma", title="Chroma", pipeline="ChromaPipeline", objective="flow_matching",
    objective_defaults=(
        "sigmoid(N(0, 1)) shifted as the base's scheduler config shifts ChromaPipeline's sampling (by the image's"
        ' token count with use_dynamic_shifting: mu 0.5 at 256 tokens to 1.15 at 4096; else its static shift), no'
        " weighting: SimpleTuner's and ai-toolkit's sigmoid default, without SimpleTuner's extra Chroma remap"),
    options=ChromaOptions, behaviour=Chroma, tiny=build_tiny,
    also_recognised=("ChromaImg2ImgPipeline", "ChromaInpaintPipeline"),
    # BFL's double blocks (Flux.1's signature) and the approximator only Chroma has: the longer signature wins
    single_file_keys=("double_blocks.", "distilled_guidance_layer."),
    lora_targets=("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0"),
    lora_target_presets=PRESETS,
    text_encoder_lora_targets=("q", "k", "v", "o"),  # T5's attention
    adapted_text_encoders=("text_encoder",),
    # the double blocks' text keys and values (FluxAttention's add_k_proj / add_v_proj read the text tokens alone);
    # the single blocks project text and image tokens together
    hypernetwork_text_stream=TextStream(layers="transformer_blocks.", keys="add_k_proj", values="add_v_proj"),
    refuses={"textual_inversion": "T5-XXL is its only text encoder, and textual inversion here learns CLIP token "
                                  "embeddings (T5 is left as it is on SD3 and Flux); no embedding file layout for a "
                                  "T5 vector is written or read here",
             # diffusers' text-encoder LoRA loading maps CLIP's module names only: ChromaPipeline.load_lora_weights
             # stops with "Could not automatically infer state dict type" on a T5 layer
             "lora.text_encoder": "ChromaPipeline.load_lora_weights cannot read a T5 LoRA: the file would not load "
                                  "in diffusers"},
    kohya_prefixes={"transformer": "lora_unet", "text_encoder": "lora_te1"},
    kohya_unet_layout="none",
    kohya_base_model_version="chroma",
    comfyui_names=COMFYUI_NAMES)
