"""Z-Image (Turbo and base): a single-stream DiT (`ZImageTransformer2DModel`) on 16-channel latents in 2x2 patches,
conditioned by Qwen3 (`text_encoder`), trained with flow matching (finetune/models/flow_matching.py).

What differs from SD3 (diffusers' ZImagePipeline and train_dreambooth_lora_z_image.py):
- conditioning is the pipeline's own `encode_prompt`: the caption in Qwen3's chat template, tokenized to 512
  tokens, the second-to-last hidden states, and of those only the caption's own tokens (a list of tensors of
  different lengths). The text cache keeps batch-first tensors of one length, so `encode_prompts` pads them back
  to the 512 the encoder read, with a mask, and `predict` hands the transformer each caption's masked tokens:
  the list encode_prompt returned, whatever batch or cache they came through;
- the transformer takes a list of latents [C, 1, h, w] (one frame each) and `t = (1000 - sigma x 1000) / 1000`,
  i.e. 1 - sigma (t_scale 1000 inside), and returns the list of its outputs, which the pipeline negates before
  the scheduler's Euler step: it predicts `x0 - noise`. `predict` negates it likewise, so the loop regresses
  the velocity `noise - x0` it regresses for every flow family, and sampling uses exactly what was trained.
Latents are `(z - shift_factor) x scaling_factor` (Flux's VAE: 0.1159, 0.3611), as SD3's.

Sigma defaults follow how the base's scheduler samples: diffusers' script draws u uniformly (its default
`--weighting_scheme none`) and indexes the scheduler's training sigmas, which its config shifts statically
(Z-Image-Turbo: `shift: 3.0`, `use_dynamic_shifting: false`); the shift is read from the base's config, so another
base gets its own, and a config with dynamic shifting gets the resolution shift the pipeline samples with. No loss
weighting. LoRA targets: the script's default, the attention's to_q, to_k, to_v and to_out.0 (every block:
refiners and main layers).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from finetune.models.base import Components, unwrapped
from finetune.models.family import Family, FamilySpec
from finetune.models.flow_matching import FlowMatchingOptions
from finetune.networks.hypernetwork_points import TextStream
from finetune.recipe.schema import ModelOptions

# Qwen3 tokens per caption (chat template included), in training and in sample grids: ZImagePipeline's default
# max_sequence_length, and the script's
MAX_SEQUENCE_LENGTH = 512


@dataclass
class ZImageOptions(ModelOptions, FlowMatchingOptions):
    """`model` for model.family zimage: the common keys and `flow`."""

    def problems(self) -> list[str]:
        return self.objective_problems()


class ZImage(Family):
    def flow_defaults(self, flow: dict[str, Any], scheduler_config: Any) -> dict[str, Any]:
        """Uniform sigma shifted as the base's scheduler config shifts (see the module docstring)."""
        dynamic = bool(scheduler_config.get("use_dynamic_shifting", False))
        return {"sigma_sampling": "uniform", "shift": None if dynamic else scheduler_config.get("shift", 1.0),
                "resolution_shift": dynamic and flow.get("shift") is None}

    def encode_prompts(self, parts: Components, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(states [batch, MAX_SEQUENCE_LENGTH, Qwen3 width], mask [batch, MAX_SEQUENCE_LENGTH]): the pipeline's
        encode_prompt, each caption's tokens padded back with zeros to the length the encoder read."""
        device = self.text_device(parts)
        # a copy: encode_prompt writes the templated prompts into the list it is given
        states, _ = self.pipeline(parts).encode_prompt(list(captions), device, do_classifier_free_guidance=False,
                                                       max_sequence_length=MAX_SEQUENCE_LENGTH)
        lengths = torch.tensor([len(s) for s in states], device=device)
        padded = torch.nn.utils.rnn.pad_sequence(states, batch_first=True)
        padded = torch.nn.functional.pad(padded, (0, 0, 0, MAX_SEQUENCE_LENGTH - padded.shape[1]))
        return padded, torch.arange(MAX_SEQUENCE_LENGTH, device=device)[None] < lengths[:, None]

    def caption_window(self, tokenizer: Any, max_token_length: int | None) -> int:
        """The caption tokens that fit in MAX_SEQUENCE_LENGTH beside the chat template's own."""
        template = tokenizer.apply_chat_template([{"role": "user", "content": ""}], tokenize=False,
                                                 add_generation_prompt=True, enable_thinking=True)
        return MAX_SEQUENCE_LENGTH - len(tokenizer(template).input_ids)

    def predict(self, parts: Components, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: tuple[torch.Tensor, torch.Tensor], conditions: dict[str, torch.Tensor]
                ) -> torch.Tensor:
        """The velocity `noise - x0` [batch, c, h, w] for `noisy` latents at sigmas `timesteps` [batch] in (0, 1):
        the transformer called as ZImagePipeline's denoising loop calls it, its output negated as the loop
        negates it."""
        states, mask = conditioning
        transformer = parts.transformer
        dtype = unwrapped(transformer).dtype
        captions = [row[keep].to(dtype) for row, keep in zip(states, mask.bool())]
        latents = list(noisy.to(dtype).unsqueeze(2).unbind(dim=0))
        t = (1000 - timesteps * 1000) / 1000  # the pipeline's (1000 - scheduler timestep) / 1000
        out = transformer(latents, t, captions, return_dict=False)[0]
        return -torch.stack(out, dim=0).squeeze(2)


def build_tiny(seed: int = 0) -> Any:
    from finetune.models.tiny_transformers import build_tiny_zimage_pipeline

    return build_tiny_zimage_pipeline(seed)


SPEC = FamilySpec(
    name="zimage", title="Z-Image", pipeline="ZImagePipeline", objective="flow_matching",
    objective_defaults=(
        "uniform, static shift from the base's scheduler config (3.0 in Z-Image-Turbo's), no weighting: "
        "diffusers' train_dreambooth_lora_z_image.py (--weighting_scheme none) indexing the scheduler's sigmas; a"
        ' config with dynamic shifting gets the resolution shift the pipeline samples with'),
    options=ZImageOptions, behaviour=ZImage, tiny=build_tiny,
    lora_targets=("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0"),
    text_encoder_lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),  # Qwen3's attention
    # the caption tokens are refined alone (context_refiner, ZSingleStreamAttnProcessor's to_k / to_v) before
    # they join the image tokens; the main layers' projections read both, the noise_refiner's the image only
    hypernetwork_text_stream=TextStream(layers="context_refiner.", keys="to_k", values="to_v"),
    refuses={"textual_inversion": "its diffusers pipeline has no embedding loader and no embedding file layout "
                                  "is defined for its text encoder"},
    # kohya-style Z-Image files (lora_unet_layers_0_attention_to_q) are read by diffusers' converter but not
    # written here: the diffusers-layout `transformer.` file is what ZImagePipeline.load_lora_weights and ComfyUI
    # load
    kohya_prefixes={"transformer": "lora_unet"},
    kohya_unet_layout="none",
    kohya_base_model_version="zimage",
    modelspec_architecture="z-image")  # no kohya or ModelSpec id for Z-Image: its family name
