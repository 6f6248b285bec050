"""Stable Diffusion 3 / 3.5: an MMDiT (`SD3Transformer2DModel`) on 16-channel latents, conditioned by CLIP-L and
CLIP-G (`text_encoder`, `text_encoder_2`, both with projections) and optionally T5-XXL (`text_encoder_3`), trained
with flow matching (finetune/models/flow_matching.py).

Conditioning is the pipeline's own `encode_prompt` (both CLIPs' penultimate states side by side, zero-padded to
T5's width and followed along the sequence by T5's states; pooled: both CLIPs' projections), so training sees what
inference sees. The transformer takes `timestep = sigma x 1000`. Latents are `(z - shift_factor) x scaling_factor`.
Defaults (diffusers' train_dreambooth_lora_sd3.py and SD3's scheduler config): sigma from logit-normal(0, 1),
shifted by 3.0; LoRA on the joint attention's projections of both streams.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from finetune.models import clip_prompts
from finetune.models.base import Components, unwrapped
from finetune.models.family import Family, FamilySpec
from finetune.models.flow_matching import FlowMatchingOptions
from finetune.networks.hypernetwork_points import TextStream
from finetune.recipe.keys import key
from finetune.recipe.schema import ModelOptions

# T5 tokens per caption in training and in sample grids (the pipeline's default; the script's is 77)
T5_TOKENS = 256


@dataclass
class StableDiffusion3Options(ModelOptions, FlowMatchingOptions):
    """`model` for model.family sd3: the common keys, `flow`, and whether T5 is loaded."""
    text_encoder_3: Literal["auto", "none"] = key(
        "auto", "`none` trains and samples without the T5 text encoder (the pipeline gives zeros in its place), to "
                "save its memory; `auto` loads it.")

    def problems(self) -> list[str]:
        return self.objective_problems()


class StableDiffusion3(Family):
    def load_kwargs(self, base: str, options: Any) -> dict[str, Any]:
        """`model.text_encoder_3: none` leaves T5 out (the pipeline then gives zeros in its place)."""
        return {"text_encoder_3": None, "tokenizer_3": None} if options.text_encoder_3 == "none" else {}

    def flow_defaults(self, flow: dict[str, Any], scheduler_config: Any) -> dict[str, Any]:
        """diffusers' train_dreambooth_lora_sd3.py: logit-normal(0, 1), shifted statically by 3.0."""
        return {"sigma_sampling": "logit_normal", "shift": 3.0, "resolution_shift": False}

    def encode_prompts(self, parts: Components, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequence [batch, 77 + T5 tokens, joint width], pooled [batch, CLIP-L + CLIP-G projections]) from the
        pipeline's encode_prompt."""
        embeds, _, pooled, _ = self.pipeline(parts).encode_prompt(
            captions, None, None, device=self.text_device(parts), do_classifier_free_guidance=False,
            max_sequence_length=T5_TOKENS)
        return embeds, pooled

    def caption_window(self, tokenizer: Any, max_token_length: int | None) -> int:
        """What CLIP sees (T5 sees more, up to T5_TOKENS); long-prompt chunking is SD 1.x/2.x and SDXL's."""
        return clip_prompts.content_window(tokenizer)

    def predict(self, parts: Components, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: tuple[torch.Tensor, torch.Tensor], conditions: dict[str, torch.Tensor]
                ) -> torch.Tensor:
        """The velocity for `noisy` latents at sigmas `timesteps` [batch] in (0, 1)."""
        embeds, pooled = conditioning
        transformer = parts.transformer
        dtype = unwrapped(transformer).dtype
        return transformer(hidden_states=noisy.to(dtype), timestep=timesteps * 1000,
                           encoder_hidden_states=embeds.to(dtype), pooled_projections=pooled.to(dtype),
                           return_dict=False)[0]


def build_tiny(seed: int = 0) -> Any:
    from finetune.models.tiny_transformers import build_tiny_sd3_pipeline

    return build_tiny_sd3_pipeline(seed)


SPEC = FamilySpec(
    name="sd3", title="Stable Diffusion 3/3.5", pipeline="StableDiffusion3Pipeline", objective="flow_matching",
    # train.compile: blocks; diffusers declares none for SD3's transformer
    compile_blocks=("JointTransformerBlock",),
    objective_defaults=(
        "logit-normal(0, 1), static shift 3.0, no weighting: diffusers' train_dreambooth_lora_sd3.py "
        "(--weighting_scheme logit_normal) indexing SD3's scheduler sigmas (shift 3.0 in its config)"),
    options=StableDiffusion3Options, behaviour=StableDiffusion3, tiny=build_tiny,
    single_file_keys=("joint_blocks.",),  # SD3's MMDiT
    lora_targets=("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                  "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"),
    text_encoder_lora_targets=("q_proj", "k_proj", "v_proj", "out_proj"),
    adapted_text_encoders=("text_encoder", "text_encoder_2"),  # the two CLIPs; T5 stays frozen
    # JointTransformerBlock.attn computes the text tokens' keys and values with add_k_proj / add_v_proj from the
    # context alone (JointAttnProcessor2_0); attn2 (SD3.5's dual attention) reads image tokens only
    hypernetwork_text_stream=TextStream(layers="transformer_blocks.", keys="add_k_proj", values="add_v_proj"),
    # kohya's SD3 files name the MMDiT in its original (joint_blocks) layout, q/k/v fused: the one ComfyUI and
    # Forge both apply (Forge ignores diffusers' transformer. names for SD3; finetune/export/lora/kohya_sd3.py)
    kohya_prefixes={"transformer": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2",
                    "text_encoder_3": "lora_te3"},
    kohya_unet_layout="mmdit",
    kohya_base_model_version="sd3",
    kohya_network_module="networks.lora_sd3",  # sd-scripts' SD3 trainer
    modelspec_architecture="stable-diffusion-3",
    embedding_keys={"text_encoder": "clip_l", "text_encoder_2": "clip_g"})
