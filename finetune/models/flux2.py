"""Flux.2 dev and klein: one double- and single-stream transformer (`Flux2Transformer2DModel`) on the 32 channels
of `AutoencoderKLFlux2` patchified 2x2, conditioned by a language model's hidden states: dev's Mistral-Small-3.1
(`Flux2Pipeline`, layers 10/20/30) or klein's Qwen3 (`Flux2KleinPipeline`, 9/18/27); `pipeline_name` reads which
from the base's model_index.json. As diffusers' pipeline_flux2(_klein).py and train_dreambooth_lora_flux2.py do:
- conditioning: the pipeline's `encode_prompt` (chat template, 512 tokens, no mask to the transformer); its
  `text_ids` (0, 0, 0, l) are rebuilt in `predict` (`_prepare_text_ids`);
- latents: the VAE's mode, patchified 2x2, `(z - bn.running_mean) / sqrt(bn.running_var + eps)`, carried
  unpatchified [B, 32, H/8, W/8] (every family's grid: the resolution shift counts tokens as Flux.1's); `predict`
  patchifies, packs with `_prepare_latent_ids` (0, h, w, 0) and unpatchifies. The *mode*, not a sample: the
  pipeline and the script encode so, so `latents_from_moments` takes the mean (std and generator unused; cached or
  not, the same latents);
- reference images (edit training, `data.control`): each one's latents as the target's (`control_latents`: the
  mode, normalised), patchified and packed after the target's tokens with ids (10 (i + 1), h, w, 0)
  (`_prepare_image_ids`); the transformer modulates them with the same timestep (Flux2Pipeline does; its KV-cache
  variant's fixed t = 0 is not taken), and the output is sliced back to the target's tokens. Sampling gives the
  pipeline `image=[...]` (`sample_kwargs`), which caps each reference at 1024^2 px area;
- `timestep` = sigma as the pipeline passes it (`(1000 sigma).to(dtype) / 1000`); the output is `noise - x0`;
- dev's embedded guidance: `model.guidance`, 1.0 in training by default (SimpleTuner's `flux_guidance_value`, and
  Flux.1's choice here after kohya's LoRA advice; diffusers' script gives 3.5; sampling: sample.guidance_scale,
  the pipeline's 4.0). klein has none (real CFG): model.guidance is refused.
Sigma: `sigmoid` shifted by the token count with Flux.1's constants (mu 0.5 at 256 tokens to 1.15 at 4096, the
scheduler config's), not the pipeline's `compute_empirical_mu` (a shift of 7.6-9.9 at 1024 px): OneTrainer PR #1516
reports BFL trained Flux.2 with Flux.1's shifting, musubi-tuner recommends `flux2_shift` (the same), SimpleTuner and
ai-toolkit use that config. A static `model.flow.shift` alone replaces it.
LoRA targets: diffusers' Flux.2 scripts' default (to_q/k/v, to_out.0, to_qkv_mlp_proj, and each single block's
attn.to_out by path: a bare `to_out` names the double blocks' ModuleList). ComfyUI names: BFL's, as diffusers'
`_convert_non_diffusers_flux2_lora_to_diffusers` reads them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from finetune.models.device_constants import on_device
from finetune.models.base import Components, unwrapped
from finetune.models.family import Family, FamilySpec, OriginalNames, base_config
from finetune.models.flow_matching import FlowMatchingOptions, shifted_as_the_scheduler
from finetune.networks.hypernetwork_points import TextStream
from finetune.recipe.keys import key
from finetune.recipe.schema import ModelOptions

MAX_SEQUENCE_LENGTH = 512  # both pipelines' default, and the scripts'
DEFAULT_GUIDANCE = 1.0  # dev's guidance embedding in training when model.guidance is unset (module docstring)
SINGLE_BLOCKS = 48  # dev's single blocks (klein 9B: 24, 4B: 20): each one's attn.to_out, by path
DOUBLE = r"transformer_blocks\.\d+\."
PRESETS = {
    # SimpleTuner's default: the attention's q/k/v/out and the single blocks' fused qkv+MLP input
    "attention": (DOUBLE + r"attn\.(to_q|to_k|to_v|to_out\.0)", r"single_" + DOUBLE + r"attn\.to_qkv_mlp_proj"),
    # DiffSynth-Studio's Flux.2 set, musubi's networks.lora_flux_2: every Linear of both block kinds (the
    # modulations live outside the blocks)
    "all_linear": (r"(single_)?" + DOUBLE + r"(attn|ff|ff_context)\..+",),
}


@dataclass
class Flux2Options(ModelOptions, FlowMatchingOptions):
    """`model` for model.family flux2: the common keys, `flow`, and dev's guidance embedding's training value."""
    guidance: Optional[float] = key(
        None, f"Flux.2 dev: the value its guidance embedding is given in training; null: {DEFAULT_GUIDANCE}. "
              "Sampling uses `sample.guidance_scale`; klein has no guidance embedding (it samples with real CFG).")

    def problems(self) -> list[str]:
        problems = self.objective_problems()
        transformer = base_config(self.base, "transformer/config.json")
        if self.guidance is not None and transformer.get("guidance_embeds") is False:
            problems.append(f"model.guidance: {self.base} has no guidance embedding (its transformer config says "
                            "guidance_embeds: false, as Flux.2 klein's; it samples with real CFG); remove it")
        return problems


class Flux2(Family):
    def pipeline_name(self, base: str) -> str:
        """Flux2KleinPipeline where the base's model_index.json names it (or, unread, its name says klein)."""
        name = base_config(base).get("_class_name") or ("Flux2KleinPipeline" if "klein" in base.lower() else "")
        return name if name in self.spec.also_recognised else self.spec.pipeline

    def load(self, base: str, **kwargs: Any) -> Components:
        parts = super().load(base, **kwargs)
        parts.extra["is_distilled"] = bool(base_config(base).get("is_distilled", False))  # klein's step-distilled
        return parts

    def pipeline(self, parts: Components, unwrap: Any = None) -> Any:
        pipe = super().pipeline(parts, unwrap)
        if "is_distilled" in getattr(pipe, "config", {}):
            pipe.register_to_config(is_distilled=parts.extra.get("is_distilled", False))
        return pipe

    def flow_defaults(self, flow: dict[str, Any], scheduler_config: Any) -> dict[str, Any]:
        """Sigmoid sampling shifted by the token count with Flux.1's constants (module docstring)."""
        return shifted_as_the_scheduler(flow, scheduler_config, "sigmoid", always_dynamic=True)

    def encode_prompts(self, parts: Components, captions: list[str]) -> torch.Tensor:
        """The stacked hidden states [batch, 512, 3 x hidden] of the pipeline's encode_prompt."""
        embeds, _ = self.pipeline(parts).encode_prompt(list(captions), device=self.text_device(parts),
                                                       max_sequence_length=MAX_SEQUENCE_LENGTH)
        return embeds

    def caption_window(self, tokenizer: Any, max_token_length: int | None) -> int:
        """The caption tokens that fit in 512 beside the chat template's (dev's has BFL's system message)."""
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input

        text = getattr(tokenizer, "tokenizer", tokenizer)  # dev's PixtralProcessor holds its tokenizer
        if "[INST]" in text.get_vocab():  # Mistral's template: dev
            template = tokenizer.apply_chat_template(format_input([""])[0], tokenize=False)
        else:
            template = tokenizer.apply_chat_template([{"role": "user", "content": ""}], tokenize=False,
                                                     add_generation_prompt=True, enable_thinking=False)
        return MAX_SEQUENCE_LENGTH - len(text(template, add_special_tokens=False).input_ids)

    def latents_from_moments(self, parts: Components, mean: torch.Tensor, std: torch.Tensor,
                             generator: torch.Generator) -> torch.Tensor:
        """The mode, patchified and BatchNorm-normalised as the pipeline does, then unpatchified (module
        docstring); std and the generator are not used."""
        from diffusers import Flux2Pipeline

        shift, scale = _batch_norm(parts.vae)
        patched = (Flux2Pipeline._patchify_latents(mean.float()) - shift.to(mean.device)) / scale.to(mean.device)
        return Flux2Pipeline._unpatchify_latents(patched)

    def predict(self, parts: Components, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: torch.Tensor,
                conditions: dict[str, torch.Tensor]) -> torch.Tensor:
        """The velocity [B, 32, h, w] for `noisy` latents [B, 32, h, w] at sigmas `timesteps` [B]: patchified and
        packed into tokens, run with the ids and guidance the pipeline's denoising loop gives, unpacked. Reference
        images (`conditions["control_latents"]`: a list of [B, 32, h_i, w_i], at most control_images; absent or
        empty: none) are packed after the target's tokens with T = 10 (i + 1) and sliced off the output."""
        from diffusers import Flux2Pipeline

        transformer = parts.transformer
        config, dtype = unwrapped(transformer).config, unwrapped(transformer).dtype
        batch, _, height, width = noisy.shape
        if height % 2 or width % 2:
            raise ValueError(f"Flux.2 patchifies latents 2x2; a {height}x{width} latent cannot be: use image sides "
                             "(and bucket sides) that are multiples of 16 px")
        value, guidance = getattr(parts.options, "guidance", None), None
        if value is not None and not config.guidance_embeds:
            raise ValueError(f"model.guidance: {parts.source} has no guidance embedding (guidance_embeds: false, "
                             "as Flux.2 klein's); remove it")
        if config.guidance_embeds:  # dev
            guidance = torch.full((batch,), DEFAULT_GUIDANCE if value is None else value, device=noisy.device,
                                  dtype=torch.float32)
        patched = Flux2Pipeline._patchify_latents(noisy)
        embeds = conditioning.to(dtype)
        references = list(conditions.get("control_latents") or ())
        if len(references) > self.spec.control_images:
            raise ValueError(f"Flux.2 takes at most {self.spec.control_images} reference images per sample here, got "
                             f"{len(references)}: give fewer control images (data.control)")
        tokens = transformer(
            hidden_states=torch.cat([Flux2Pipeline._pack_latents(patched).to(dtype),
                                     *(_reference_tokens(r, batch, dtype) for r in references)], dim=1),
            timestep=(timesteps * 1000).to(dtype) / 1000, guidance=guidance, encoder_hidden_states=embeds,
            # built from the shapes alone (all the helpers read), on the host, once per shape
            txt_ids=on_device(("flux2 text ids", *embeds.shape[:2]),
                              lambda: Flux2Pipeline._prepare_text_ids(torch.empty(*embeds.shape[:2], 1)), noisy.device),
            img_ids=_image_ids(batch, patched.shape[2:], [r.shape[2:] for r in references], noisy.device),
            return_dict=False)[0]
        target = tokens[:, :patched.shape[2] * patched.shape[3]]  # the references' tokens sliced off, as sampling does
        # tokens are row-major, as img_ids say: the pipeline's _unpack_latents_with_ids is this reshape
        return Flux2Pipeline._unpatchify_latents(target.transpose(1, 2).reshape(patched.shape))

    def sample_kwargs(self, control_images: list[Any], width: int, height: int,
                      pipeline: Any = None) -> dict[str, Any]:
        """Flux2(Klein)Pipeline's `image`: the reference images in order (the i-th gets T = 10 (i + 1)); nothing
        without any. ValueError for more than control_images."""
        if len(control_images) > self.spec.control_images:
            raise ValueError(f"Flux.2 takes at most {self.spec.control_images} reference images per prompt here, "
                             f"got {len(control_images)}")
        return {"image": list(control_images)} if control_images else {}


def _reference_tokens(latents: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """A reference image's latents [B, 32, h, w] (Family.control_latents) as the pipeline's tokens [B, h/2 * w/2,
    128]: patchified 2x2 and packed row-major, like the target's."""
    from diffusers import Flux2Pipeline

    if latents.shape[0] != batch:
        raise ValueError(f"reference latents of {latents.shape[0]} samples for a batch of {batch}")
    if latents.shape[2] % 2 or latents.shape[3] % 2:
        raise ValueError(f"Flux.2 patchifies latents 2x2; a {latents.shape[2]}x{latents.shape[3]} reference latent "
                         "cannot be: use control image sides that are multiples of 16 px")
    return Flux2Pipeline._pack_latents(Flux2Pipeline._patchify_latents(latents)).to(dtype)


def _image_ids(batch: int, target: tuple[int, int], references: list[tuple[int, int]],
               device: torch.device) -> torch.Tensor:
    """Position ids [B, tokens, 4] of the target's patchified h x w grid, (0, row, col, 0), then of each
    reference's latent grid (h_i x w_i before patchifying), (10 (i + 1), row, col, 0), as the pipeline's
    _prepare_latent_ids and _prepare_image_ids give them. Built on the host once per shape."""
    def build() -> torch.Tensor:
        from diffusers import Flux2Pipeline

        ids = Flux2Pipeline._prepare_latent_ids(torch.empty(batch, 1, *target))
        if not references:
            return ids
        grids = [torch.empty(1, 1, h // 2, w // 2) for h, w in references]
        return torch.cat([ids, Flux2Pipeline._prepare_image_ids(grids).expand(batch, -1, -1)], dim=1)

    return on_device(("flux2 image ids", batch, tuple(target), tuple(map(tuple, references))), build, device)


def _batch_norm(vae: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(running mean, sqrt(running var + eps)) [1, 128, 1, 1] of the VAE's BatchNorm, in float32."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1).float()
    return mean, torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1).float() + vae.config.batch_norm_eps)


def build_tiny(seed: int = 0, klein: bool = False) -> Any:
    """Flux2Pipeline (or with `klein`, Flux2KleinPipeline) in miniature: a Mistral3 (30 text layers 16 wide, a
    one-layer Pixtral tower) or a Qwen3 (27 layers) read at the pipelines' layer taps, a transformer 32 wide (one
    double and one single block, RoPE on 4 axes) on 16 channels (a 4-channel VAE, 4x down, patchified 2x2) with
    random BatchNorm statistics, Flux.2's scheduler config; 32 px images give 8x8 latents."""
    from diffusers import (AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline,
                           Flux2Transformer2DModel)
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, Qwen3Config, Qwen3ForCausalLM

    from finetune.models.tiny_transformers import build_mistral_tokenizer, build_qwen_tokenizer

    torch.manual_seed(seed)
    text = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                max_position_embeddings=1024, attention_dropout=0.0)
    if klein:
        tokenizer = build_qwen_tokenizer(MAX_SEQUENCE_LENGTH)
        encoder = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tokenizer), num_hidden_layers=27,
                                               pad_token_id=tokenizer.pad_token_id, **text))
    else:
        tokenizer = build_mistral_tokenizer(MAX_SEQUENCE_LENGTH)
        encoder = Mistral3ForConditionalGeneration(Mistral3Config(
            text_config=dict(model_type="mistral", vocab_size=len(tokenizer), num_hidden_layers=30,
                             sliding_window=None, pad_token_id=tokenizer.pad_token_id, **text),
            vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                               num_attention_heads=2, image_size=32, patch_size=8),
            image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), spatial_merge_size=1))
    vae = AutoencoderKLFlux2(latent_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1,
                             down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                             norm_num_groups=8, sample_size=32)
    vae.bn.running_mean.normal_(0.0, 0.5)  # released statistics are not the identity: make the test see them
    vae.bn.running_var.uniform_(0.5, 2.0)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=3 * 16, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=not klein)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    cls = Flux2KleinPipeline if klein else Flux2Pipeline
    pipe = cls(scheduler=scheduler, vae=vae, text_encoder=encoder, tokenizer=tokenizer, transformer=transformer)
    for part in (encoder, transformer, vae):
        part.eval()
    return pipe


SPEC = FamilySpec(
    name="flux2", title="Flux.2 dev/klein", pipeline="Flux2Pipeline", objective="flow_matching",
    objective_defaults=(
        "sigmoid(N(0, 1)) shifted by the image's token count with Flux.1's constants (mu 0.5 at 256 tokens to "
        "1.15 at 4096: e^1.15 = 3.16 at 1024 px), not the pipeline's sampling shift (7.6-9.9 at 1024 px), no "
        "weighting: OneTrainer PR #1516 (BFL trained Flux.2 with Flux.1's shifting), musubi-tuner's recommended "
        "flux2_shift, SimpleTuner's and ai-toolkit's scheduler config"),
    options=Flux2Options, behaviour=Flux2, tiny=build_tiny, also_recognised=("Flux2KleinPipeline",),
    single_file_keys=("double_blocks.", "single_stream_modulation."),  # BFL's; Flux.1's files lack the second
    lora_targets=("to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj",
                  *(f"single_transformer_blocks.{i}.attn.to_out" for i in range(SINGLE_BLOCKS))),
    lora_target_presets=PRESETS,
    text_encoder_lora_targets=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    adapted_text_encoders=("text_encoder",),
    # the double blocks project the text tokens to keys and values alone (Flux2AttnProcessor's add_k/v_proj)
    hypernetwork_text_stream=TextStream(layers="transformer_blocks.", keys="add_k_proj", values="add_v_proj"),
    refuses={"textual_inversion": "its pipelines have no embedding loader and no embedding file layout is defined "
                                  "for its language-model text encoders (Mistral-Small-3.1, Qwen3)"},
    kohya_prefixes={"transformer": "lora_unet"},
    kohya_unet_layout="none",
    kohya_base_model_version="flux2",
    # diffusers' _convert_non_diffusers_flux2_lora_to_diffusers, inverted (norm_out.linear is left out: BFL's
    # final_layer.adaLN_modulation.1 stacks shift and scale the other way round)
    comfyui_names=OriginalNames(
        blocks={"transformer_blocks": "double_blocks", "single_transformer_blocks": "single_blocks"},
        renamed={"transformer_blocks": {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
                                        "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
                                        "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2"},
                 "single_transformer_blocks": {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}},
        fused={"transformer_blocks": {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                                      "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}},
        top={"x_embedder": "img_in", "context_embedder": "txt_in",
             "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
             "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
             "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
             "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
             "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
             "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
             "single_stream_modulation.linear": "single_stream_modulation.lin", "proj_out": "final_layer.linear"}),
    # reference images per sample: BFL's limit for klein (4; dev: "recommended max 6", docs.bfl.ai's editing
    # guide); each adds a whole image's tokens to every attention, the memory a 24 GB run has least of
    control_images=4,
    modelspec_architecture=None)
