"""Flux.1 Kontext dev: Flux.1-dev's transformer, text encoders and VAE (`FluxKontextPipeline`), trained to edit: a
control (reference) image's latents join the target's tokens, and the caption says the edit. Built from flux.py's
module helpers (packing, ids, guidance, presets), not from its Family class.

What FluxKontextPipeline does, and so what training does (diffusers' pipeline_flux_kontext.py and
train_dreambooth_lora_flux_kontext.py):
- conditioning, latents, `timestep` and guidance are Flux.1-dev's (flux.py's docstring); the timestep is given as
  the pipeline gives it, `(1000 sigma)` in the transformer's dtype, then / 1000;
- the control image is VAE-encoded to its distribution's *mode* (`sample_mode="argmax"`), normalised
  `(z - shift) x scale` (`Family.control_latents`), packed 2x2 like the target, and its tokens are appended after
  the target's with position ids (1, row, col) (the target's are (0, row, col)); the output is sliced back to the
  target's tokens and unpacked. A control image may be of another size than the target: its ids follow its own
  grid. Without a control image (`conditions` without "control_latents") the call is the pipeline's
  text-to-image one;
- the model's own resolutions: the pipeline snaps the control image to one of 17 ~1 MP sizes
  (PREFERRED_KONTEXT_RESOLUTIONS) unless `_auto_resize=False`, and sizes its output to `max_area` (1024^2) whatever
  height and width say. Sample grids pass `_auto_resize=False` and `max_area = width x height`, so that the
  control image is used at the size it was given and the result has the size asked for (`sample_kwargs`).

Guidance: model.guidance, 1.0 in training by default, as flux.py (diffusers' Kontext script uses 3.5; ai-toolkit
and kohya's Flux advice 1.0). Sampling: the pipeline's 3.5. LoRA targets: diffusers' Kontext script's default,
Flux.1's set and the single blocks' proj_mlp.

Telling it apart: a diffusers folder says FluxKontextPipeline in model_index.json. A single Kontext checkpoint
holds exactly Flux.1-dev's keys (the architecture is unchanged; only the weights differ), so it is told as flux:
set `model.family: flux_kontext` (and `model.config` to a Kontext pipeline folder or hub id) for one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from finetune.models.base import Components, unwrapped
from finetune.models.family import Family, FamilySpec
from finetune.models.flow_matching import FlowMatchingOptions, shifted_as_the_scheduler
from finetune.models.flux import (
    DEFAULT_GUIDANCE, PRESETS, T5_TOKENS, check_packable, guidance_input, guidance_problems, image_ids, pack,
    unpack)
from finetune.networks.hypernetwork_points import TextStream
from finetune.recipe.keys import key
from finetune.recipe.schema import ModelOptions

# the first position coordinate of the control image's tokens (FluxKontextPipeline.prepare_latents); the target's is 0
CONTROL_ID = 1
# Flux.1's targets and the single blocks' MLP input: train_dreambooth_lora_flux_kontext.py's default
LORA_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                "ff_context.net.2", "proj_mlp")


@dataclass
class KontextOptions(ModelOptions, FlowMatchingOptions):
    """`model` for model.family flux_kontext: the common keys, `flow`, and the guidance embedding's training
    value."""
    guidance: Optional[float] = key(
        None, f"Flux.1 Kontext: the value its guidance embedding is given in training; null: {DEFAULT_GUIDANCE}, "
              "as for Flux.1-dev (diffusers' Kontext script uses 3.5). Sampling uses `sample.guidance_scale`.")

    def problems(self) -> list[str]:
        return self.objective_problems() + guidance_problems(self.guidance, self.base)


def t5_tokens(tokenizer_2: Any) -> int:
    """T5 tokens per caption, in training and sampling alike: FluxKontextPipeline's default max_sequence_length
    (512), or fewer where the base's T5 tokenizer is shorter (`model_max_length`: the shapes edit base's 16), since
    the pipeline pads every caption to max_sequence_length and the transformer attends to the pads."""
    return min(T5_TOKENS, int(tokenizer_2.model_max_length))


class FluxKontext(Family):
    def flow_defaults(self, flow: dict[str, Any], scheduler_config: Any) -> dict[str, Any]:
        """Flux.1's: sigmoid sampling shifted by the target's token count (the pipeline's mu counts the target's
        tokens only, not the control's); a static `model.flow.shift` alone turns the resolution shift off."""
        return shifted_as_the_scheduler(flow, scheduler_config, "sigmoid", always_dynamic=True)

    def encode_prompts(self, parts: Components, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(T5 states [batch, t5_tokens, T5 width], CLIP-L pooled [batch, CLIP width]) from the pipeline's
        encode_prompt, as flux.py's; its text_ids (zeros) are rebuilt by predict."""
        embeds, pooled, _ = self.pipeline(parts).encode_prompt(
            list(captions), None, device=self.text_device(parts),
            max_sequence_length=t5_tokens(parts.tokenizers["tokenizer_2"]))
        return embeds, pooled

    def predict(self, parts: Components, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: tuple[torch.Tensor, torch.Tensor], conditions: dict[str, Any]) -> torch.Tensor:
        """The velocity [B, C, h, w] for the target's `noisy` latents [B, C, h, w] at sigmas `timesteps` [B],
        given `conditions["control_latents"]` (a list of at most one [B, C, h_c, w_c] tensor; absent or empty:
        none): target and control tokens in one sequence with the pipeline's ids, the target's slice unpacked.
        ValueError for more control images than one, or a control batch or size that cannot be packed."""
        embeds, pooled = conditioning
        transformer = parts.transformer
        dtype = unwrapped(transformer).dtype
        device = noisy.device
        batch, _, height, width = noisy.shape
        check_packable(height, width, "Flux.1 Kontext")
        tokens, ids = [pack(noisy.to(dtype))], [image_ids(height, width, device, dtype)]
        controls = list(conditions.get("control_latents") or ())
        if len(controls) > self.spec.control_images:
            raise ValueError(f"Flux.1 Kontext takes {self.spec.control_images} control image per sample, got "
                             f"{len(controls)}: give one control image (data.control)")
        for control in controls:
            if control.shape[0] != batch:
                raise ValueError(f"control latents of {control.shape[0]} samples for a batch of {batch}")
            check_packable(*control.shape[2:], "Flux.1 Kontext")
            tokens.append(pack(control.to(device, dtype)))
            ids.append(image_ids(*control.shape[2:], device, dtype, first=CONTROL_ID))
        out = transformer(
            hidden_states=torch.cat(tokens, dim=1), timestep=(timesteps * 1000).to(dtype) / 1000,
            guidance=guidance_input(parts, batch, device), pooled_projections=pooled.to(dtype),
            encoder_hidden_states=embeds.to(dtype),
            txt_ids=torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype), img_ids=torch.cat(ids, dim=0),
            return_dict=False)[0]
        return unpack(out[:, :tokens[0].shape[1]], height, width)

    def sample_kwargs(self, control_images: list[Any], width: int, height: int,
                      pipeline: Any = None) -> dict[str, Any]:
        """FluxKontextPipeline's arguments for a width x height sample: `max_area` = width x height with
        `_auto_resize` off, so the output has the size asked (the pipeline rescales to max_area, 1024^2 by
        default) and the control image (at most one PIL image) is taken at its own size, not snapped to the
        pipeline's ~1 MP resolutions; given the `pipeline`, captions padded to the T5 tokens training used."""
        if len(control_images) > self.spec.control_images:
            raise ValueError(f"Flux.1 Kontext takes {self.spec.control_images} control image per prompt, got "
                             f"{len(control_images)}: give one control_image")
        given = {"image": control_images[0]} if control_images else {}
        if pipeline is not None:
            given["max_sequence_length"] = t5_tokens(pipeline.tokenizer_2)
        return {**given, "max_area": width * height, "_auto_resize": False}


def build_tiny(seed: int = 0) -> Any:
    """A FluxKontextPipeline on the tiny Flux.1-dev's parts (finetune/models/tiny_transformers.py: CLIP-L and T5
    32 wide, one double and one single block, a 4-channel VAE packed 2x2 into 16); 32 px."""
    from diffusers import FluxKontextPipeline

    from finetune.models.tiny_transformers import build_tiny_flux_pipeline

    return FluxKontextPipeline(**build_tiny_flux_pipeline(seed).components)


SPEC = FamilySpec(
    name="flux_kontext", title="Flux.1 Kontext", pipeline="FluxKontextPipeline", objective="flow_matching",
    objective_defaults=(
        "Flux.1's: sigmoid(N(0, 1)) shifted by the target's token count as FluxKontextPipeline samples (e^1.15 = "
        "3.16 at 1024 px), no weighting"),
    options=KontextOptions, behaviour=FluxKontext, tiny=build_tiny,
    also_recognised=("FluxKontextInpaintPipeline",),
    # no single-file signature: a Kontext checkpoint holds Flux.1-dev's keys (module docstring)
    control_images=1,  # FluxKontextPipeline takes one image
    lora_targets=LORA_TARGETS,
    lora_target_presets=PRESETS,  # Flux.1's named sets: the same modules
    text_encoder_lora_targets=("q_proj", "k_proj", "v_proj", "out_proj"),
    adapted_text_encoders=("text_encoder",),  # CLIP-L only, as on Flux.1
    hypernetwork_text_stream=TextStream(layers="transformer_blocks.", keys="add_k_proj", values="add_v_proj"),
    # Flux.1's module names: kohya's BFL layout (finetune/export/lora/kohya_flux.py), which ComfyUI and musubi-tuner
    # read for Kontext as for Flux.1; the diffusers `transformer.` file loads with load_lora_weights and in ComfyUI
    kohya_prefixes={"transformer": "lora_unet", "text_encoder": "lora_te1"},
    kohya_unet_layout="bfl",
    kohya_base_model_version="flux1",  # kohya has no Kontext version: the network is Flux.1's
    kohya_network_module="networks.lora_flux",
    modelspec_architecture="flux-1-dev",
    modelspec_implementation="https://github.com/black-forest-labs/flux",
    embedding_keys={"text_encoder": "clip_l"})
