"""Flux.1 dev / schnell: a double- and single-stream transformer (`FluxTransformer2DModel`) on 16-channel latents
packed into 2x2 patches, conditioned by T5-XXL's last hidden states (`text_encoder_2`, the sequence) and CLIP-L's
pooled output (`text_encoder`, one vector), trained with flow matching (finetune/models/flow_matching.py).

What differs from SD3 (diffusers' FluxPipeline and train_dreambooth_lora_flux.py):
- conditioning is the pipeline's own `encode_prompt` (T5 states [batch, 512, 4096] at the pipeline's default
  `max_sequence_length`, CLIP-L pooled [batch, 768]); its `text_ids` are zeros [512, 3], rebuilt in `predict`;
- the transformer reads tokens: latents [B, 16, h, w] are packed 2x2 into [B, h/2 * w/2, 64] with position ids
  (0, row, col) per token (`img_ids`), and its output unpacked back, so the loss stays in latent shape (h and w
  must be even: image sides a multiple of 16 px);
- `timestep = sigma` (the model multiplies by 1000 inside; the script's `timesteps / 1000`);
- dev's guidance embedding (`guidance_embeds`) takes one scalar per sample: `model.guidance`, default 1.0 for
  training (kohya's docs/flux_train_network.md recommend `--guidance_scale 1.0` for LoRA; SimpleTuner's
  `--flux_guidance_value` defaults to 1.0; diffusers' script uses 3.5, the sampling value); schnell has none.
Latents are `(z - shift_factor) x scaling_factor` (Flux's VAE: 0.1159, 0.3611), as SD3's.

Sigma defaults: `sigmoid` sampling (u = sigmoid(N(0, 1)), ai-toolkit's default and SimpleTuner's) shifted by the
image's token count as FluxPipeline samples (mu from 0.5 at 256 tokens to 1.15 at 4096: kohya's
`--timestep_sampling flux_shift`). At 1024 px (4096 tokens) that is a shift of e^1.15 = 3.158, the static
`--discrete_flow_shift 3.1582` kohya's docs recommend, and smaller images get the smaller shift they are sampled
with. (diffusers' script draws u uniformly and leaves it unshifted, since Flux's scheduler shifts dynamically.) A
recipe's `model.flow.shift` without `model.flow.resolution_shift` replaces the resolution shift by that static one.
LoRA targets: the diffusers Flux script's default (both streams' attention and MLPs in the double blocks, and
q/k/v in the single blocks); `strategy.target_preset` names the other anchors' sets (`lora_target_presets`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from finetune.models.device_constants import on_device
from finetune.models.base import Components, unwrapped
from finetune.models.family import Family, FamilySpec, base_config
from finetune.models.flow_matching import FlowMatchingOptions, shifted_as_the_scheduler
from finetune.networks.hypernetwork_points import TextStream
from finetune.recipe.keys import key
from finetune.recipe.schema import ModelOptions

# T5 tokens per caption in training and in sample grids: FluxPipeline's default max_sequence_length (dev's 512;
# schnell was distilled at 256 but its pipeline call pads to the same default)
T5_TOKENS = 512
# the guidance embedding's value in training when model.guidance is not set (see the module docstring)
DEFAULT_GUIDANCE = 1.0
# both block kinds' attention projections, as a module path (single blocks have q/k/v only)
ATTENTION = (r"(single_)?transformer_blocks\.\d+\.attn\."
             r"(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)")

# strategy.target_preset's sets
PRESETS = {
    # SimpleTuner's --flux_lora_target default "all": both streams' attention projections (single blocks:
    # q/k/v; their output projection is proj_out, shared with the MLP)
    "attention": (ATTENTION,),
    # SimpleTuner's "all+ffs": attention, both streams' MLPs, the single blocks' proj_mlp and proj_out (only
    # theirs: its bare "proj_out" also catches the final layer)
    "attention_mlp": (ATTENTION, r"transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)",
                      r"single_transformer_blocks\.\d+\.(proj_mlp|proj_out)"),
    # kohya's networks/lora_flux.py default: every Linear of the double and single blocks, the modulations
    # (norm1.linear, norm1_context.linear, norm.linear) included; ai-toolkit adds the embedders and final layer
    "all_linear": (r"(single_)?transformer_blocks\.\d+\..+",),
}


@dataclass
class FluxOptions(ModelOptions, FlowMatchingOptions):
    """`model` for model.family flux: the common keys, `flow`, and the guidance embedding's training value."""
    guidance: Optional[float] = key(
        None, f"Flux.1-dev: the value its guidance embedding is given in training; null: {DEFAULT_GUIDANCE}, as "
              "kohya's and SimpleTuner's docs advise for LoRA (diffusers' script uses 3.5). Sampling uses "
              "`sample.guidance_scale`; schnell has no guidance embedding.")

    def problems(self) -> list[str]:
        return self.objective_problems() + guidance_problems(self.guidance, self.base)


def guidance_problems(guidance: Optional[float], base: str) -> list[str]:
    """model.guidance set on a base whose transformer has no guidance embedding (Flux.1-schnell's config says
    guidance_embeds: false): the message refusing it; [] otherwise. Shared by the Flux.1-type families."""
    if guidance is not None and base_config(base, "transformer/config.json").get("guidance_embeds") is False:
        return [f"model.guidance: {base} has no guidance embedding (its transformer config says "
                "guidance_embeds: false, as Flux.1-schnell's); remove it"]
    return []


class Flux(Family):
    def flow_defaults(self, flow: dict[str, Any], scheduler_config: Any) -> dict[str, Any]:
        """Sigmoid sampling shifted by the image's token count (see the module docstring); a static
        `model.flow.shift` alone turns the resolution shift off (one shift, the one asked for)."""
        return shifted_as_the_scheduler(flow, scheduler_config, "sigmoid", always_dynamic=True)

    def encode_prompts(self, parts: Components, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(T5 states [batch, T5_TOKENS, T5 width], CLIP-L pooled [batch, CLIP width]) from the pipeline's
        encode_prompt; its text_ids (zeros) are rebuilt by predict, so the cache keeps batch-first tensors only."""
        embeds, pooled, _ = self.pipeline(parts).encode_prompt(captions, None, device=self.text_device(parts),
                                                               max_sequence_length=T5_TOKENS)
        return embeds, pooled

    def predict(self, parts: Components, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: tuple[torch.Tensor, torch.Tensor], conditions: dict[str, torch.Tensor]
                ) -> torch.Tensor:
        """The velocity [B, C, h, w] for `noisy` latents [B, C, h, w] at sigmas `timesteps` [B] in (0, 1): packed
        into tokens, run with the ids and guidance FluxPipeline gives, unpacked."""
        embeds, pooled = conditioning
        transformer = parts.transformer
        dtype = unwrapped(transformer).dtype
        batch, _, height, width = noisy.shape
        check_packable(height, width, "Flux")
        tokens = transformer(
            hidden_states=pack(noisy.to(dtype)), timestep=timesteps.to(dtype),
            guidance=guidance_input(parts, batch, noisy.device), pooled_projections=pooled.to(dtype),
            encoder_hidden_states=embeds.to(dtype),
            txt_ids=torch.zeros(embeds.shape[1], 3, device=noisy.device, dtype=dtype),
            img_ids=image_ids(height, width, noisy.device, dtype), return_dict=False)[0]
        return unpack(tokens, height, width)


def check_packable(height: int, width: int, title: str) -> None:
    """ValueError naming the fix unless a [.., h, w] latent packs into 2x2 patches (h and w even)."""
    if height % 2 or width % 2:
        raise ValueError(f"{title} packs latents in 2x2 patches; a {height}x{width} latent cannot be packed: "
                         "use image sides (and bucket sides) that are multiples of 16 px")


def guidance_input(parts: Components, batch: int, device: torch.device) -> Optional[torch.Tensor]:
    """The guidance embedding's input [batch] (float32): model.guidance, DEFAULT_GUIDANCE when unset; None for a
    transformer without one (schnell's). ValueError when model.guidance is set for such a transformer."""
    config = unwrapped(parts.transformer).config
    value = getattr(parts.options, "guidance", None)
    if value is not None and not config.guidance_embeds:
        raise ValueError(f"model.guidance: {parts.source} has no guidance embedding (guidance_embeds: false, "
                         "as Flux.1-schnell's); remove it")
    if not config.guidance_embeds:
        return None
    return torch.full((batch,), DEFAULT_GUIDANCE if value is None else value, device=device, dtype=torch.float32)


def image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype, first: int = 0) -> torch.Tensor:
    """Position ids [h/2 * w/2, 3] of the tokens `pack` makes of an h x w latent: (first, row, col), as
    FluxPipeline._prepare_latent_image_ids gives them (first 0); FluxKontextPipeline's reference image takes
    first = 1. Built once per shape and device."""
    def build() -> torch.Tensor:
        from diffusers import FluxPipeline

        ids = FluxPipeline._prepare_latent_image_ids(1, height // 2, width // 2, "cpu", torch.float32)
        ids[..., 0] = first
        return ids

    return on_device(("flux image ids", height, width, first), build, device, dtype)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, h/2 * w/2, 4C]: each 2x2 patch one token, row-major (FluxPipeline._pack_latents)."""
    from diffusers import FluxPipeline

    batch, channels, height, width = latents.shape
    return FluxPipeline._pack_latents(latents, batch, channels, height, width)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, h/2 * w/2, 4C] -> [B, C, h, w], the inverse of `pack` (FluxPipeline._unpack_latents, given latent
    sides with a scale factor of 1)."""
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(tokens, height, width, 1)


def build_tiny(seed: int = 0) -> Any:
    from finetune.models.tiny_transformers import build_tiny_flux_pipeline

    return build_tiny_flux_pipeline(seed)


SPEC = FamilySpec(
    name="flux", title="Flux.1 dev/schnell", pipeline="FluxPipeline", objective="flow_matching",
    objective_defaults=(
        "sigmoid(N(0, 1)) shifted by the image's token count as FluxPipeline samples (e^1.15 = 3.16 at 1024 px), "
        "no weighting: ai-toolkit's and SimpleTuner's sigmoid default with kohya's flux_shift; at 1024 px kohya's"
        ' recommended --discrete_flow_shift 3.1582'),
    options=FluxOptions, behaviour=Flux, tiny=build_tiny,
    single_file_keys=("double_blocks.",),  # BFL's double-stream blocks
    lora_targets=("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
                  "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                  "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"),
    # strategy.target_preset: the anchors' target sets by name, as module-path patterns (both block kinds; the
    # unset default is lora_targets above, diffusers' script default)
    lora_target_presets=PRESETS,
    text_encoder_lora_targets=("q_proj", "k_proj", "v_proj", "out_proj"),
    adapted_text_encoders=("text_encoder",),  # CLIP-L only: T5 is never adapted here
    # the double blocks' text keys and values (FluxAttnProcessor's add_k_proj / add_v_proj on the context); the
    # single blocks project text and image tokens together (single_transformer_blocks: not under this prefix)
    hypernetwork_text_stream=TextStream(layers="transformer_blocks.", keys="add_k_proj", values="add_v_proj"),
    # kohya's Flux files name BFL's modules, q/k/v fused (finetune/export/lora/kohya_flux.py); the
    # diffusers-layout `transformer.` file is what diffusers, ComfyUI and ai-toolkit load
    kohya_prefixes={"transformer": "lora_unet", "text_encoder": "lora_te1"},
    kohya_unet_layout="bfl",
    kohya_base_model_version="flux1",  # kohya's flux_utils.MODEL_VERSION_FLUX_V1
    kohya_network_module="networks.lora_flux",  # sd-scripts' Flux trainer
    modelspec_architecture="flux-1-dev",  # "flux-1-schnell" for a schnell base (family_header.architecture)
    modelspec_implementation="https://github.com/black-forest-labs/flux",
    embedding_keys={"text_encoder": "clip_l"})
