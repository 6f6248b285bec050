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

import os
from typing import Any

import torch

from finetune.models import clip_prompts
from finetune.models.base import Components, unwrapped
from finetune.models.flow_matching import FlowMatchingObjective, from_recipe
from finetune.models.loading import load_frozen
from finetune.models.stable_diffusion import StableDiffusion
from finetune.networks.hypernetwork_points import TextStream

# T5 tokens per caption in training and in sample grids (the pipeline's default; the script's is 77)
T5_TOKENS = 256


class StableDiffusion3(StableDiffusion):
    name = "sd3"
    lora_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
    conv_lora_targets = ()  # no convolutions past the patch embedding
    text_encoder_lora_targets = ("q_proj", "k_proj", "v_proj", "out_proj")
    # kohya's SD3 files name the MMDiT in its original (joint_blocks) layout, q/k/v fused: the one ComfyUI and
    # Forge both apply (Forge ignores diffusers' transformer. names for SD3; finetune/export/lora/kohya_sd3.py)
    kohya_prefixes = {"transformer": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2",
                      "text_encoder_3": "lora_te3"}
    kohya_unet_layout = "sd3"
    embedding_keys = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
    kohya_base_model_version = "sd3"
    default_flow = {"sigma_sampling": "logit_normal", "shift": 3.0, "resolution_shift": False}
    # JointTransformerBlock.attn computes the text tokens' keys and values with add_k_proj / add_v_proj from the
    # context alone (JointAttnProcessor2_0); attn2 (SD3.5's dual attention) reads image tokens only
    hypernetwork_text_stream = TextStream(layers="transformer_blocks.", keys="add_k_proj", values="add_v_proj")

    def load(self, base: str, *, revision: str | None = None, variant: str | None = None,
             dtype: torch.dtype = torch.float32, config: str | None = None, vae: str | None = None,
             without: tuple[str, ...] = ()) -> Components:
        """As StableDiffusion.load; `without=("text_encoder_3",)` leaves T5 out (the pipeline then gives zeros
        in its place), as `model.text_encoder_3: none` asks."""
        from diffusers import StableDiffusion3Pipeline

        skipped = {name: None for part in without for name in (part, part.replace("text_encoder", "tokenizer"))}
        return load_frozen(StableDiffusion3Pipeline, base, revision=revision, variant=variant, dtype=dtype,
                           config=config, vae=vae, extra_kwargs=skipped, ddpm=False)

    def objective(self, parts: Components, **flow: Any) -> FlowMatchingObjective:
        """Flow matching with the recipe's `flow` choices, the family's defaults where they say auto / None."""
        return from_recipe(flow, self.default_flow, parts.extra["sampling_scheduler"].config)

    def text_encoders(self, parts: Components) -> list[tuple[str, Any, Any]]:
        """The two CLIPs (what textual inversion and text-encoder LoRA adapt; T5 stays frozen)."""
        names = [n for n in parts.text_encoder_names if n in self.embedding_keys]
        return [(name, parts.tokenizers["tokenizer" + name.removeprefix("text_encoder")],
                 unwrapped(parts.modules[name])) for name in names]

    def latents_from_moments(self, parts: Components, mean: torch.Tensor, std: torch.Tensor,
                             generator: torch.Generator) -> torch.Tensor:
        """One latent sample, shifted and scaled as the transformer takes it."""
        from diffusers.utils.torch_utils import randn_tensor

        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        config = parts.vae.config
        return ((mean + std * noise).float() - (config.shift_factor or 0.0)) * config.scaling_factor

    def encode_prompts(self, parts: Components, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequence [batch, 77 + T5 tokens, joint width], pooled [batch, CLIP-L + CLIP-G projections]) from the
        pipeline's encode_prompt."""
        # the text encoders' device: the transformer may not be on it yet (the loop moves it after the caches)
        device = next(unwrapped(parts.text_encoder).parameters()).device
        embeds, _, pooled, _ = self.pipeline(parts).encode_prompt(
            captions, None, None, device=device, do_classifier_free_guidance=False, max_sequence_length=T5_TOKENS)
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

    def save_single_file(self, parts: Components, path: str, metadata: dict[str, str] | None = None,
                         dtype: torch.dtype | None = None) -> Any:
        raise ValueError("finetune writes no single-file SD3 checkpoint yet; give --out a folder (a diffusers "
                         "pipeline folder, which diffusers and ComfyUI load)")

    def pipeline(self, parts: Components, unwrap: Any = None) -> Any:
        from diffusers import StableDiffusion3Pipeline

        unwrap = unwrap or unwrapped
        modules = {name: unwrap(module) for name, module in parts.modules.items()}
        return StableDiffusion3Pipeline(
            transformer=modules["transformer"], vae=modules["vae"], scheduler=parts.extra["sampling_scheduler"],
            text_encoder=modules["text_encoder"], tokenizer=parts.tokenizers["tokenizer"],
            text_encoder_2=modules["text_encoder_2"], tokenizer_2=parts.tokenizers["tokenizer_2"],
            text_encoder_3=modules.get("text_encoder_3"), tokenizer_3=parts.tokenizers.get("tokenizer_3"))

    def tokenizer_of(self, base: str) -> Any | None:
        from transformers import CLIPTokenizer

        folder = os.path.join(os.path.expanduser(base), "tokenizer")
        return CLIPTokenizer.from_pretrained(folder) if os.path.isdir(folder) else None
