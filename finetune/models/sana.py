"""Sana (Efficient-Large-Model/Sana_1600M_1024px_diffusers): a linear-attention DiT (`SanaTransformer2DModel`, 20
blocks 2240 wide, 1.6 B) on the 32-channel latents of the 32x-downsampling DC-AE (`AutoencoderDC`), conditioned by
Gemma-2-2B's last hidden states (`Gemma2Model`) under their mask, trained with flow matching (flow_matching.py).

What the pipeline does, and so what training does (diffusers' SanaPipeline and train_dreambooth_lora_sana.py):
- conditioning is the pipeline's own `encode_prompt`, with the complex human instruction (CHI) that
  `SanaPipeline.__call__` prepends by default (NVlabs' Sana trains with it too; the diffusers script only with
  `--complex_human_instruction`): captions lowercased, `CHI + caption` padded to CHI's tokens + 298, then the first
  token and the last 299 kept: 300 states and their mask, one length per caption. Sample grids call the pipeline
  with the prompt, so they read what training read;
- latents are the DC-AE's `encode(x).latent x scaling_factor` (0.41407; no shift, no distribution: std 0);
- the transformer takes the latents [B, 32, h, w] as they are (patch 1), `encoder_attention_mask` as the
  pipeline gives it, and `timestep = sigma x 1000 x timestep_scale` (the scheduler's t; the pipeline's DPM-Solver
  truncates t to an integer at inference); its output is the velocity `noise - x0` (the scheduler's
  flow_prediction).

Sigma defaults: `sigmoid` (u = sigmoid(N(0, 1)), SimpleTuner's default, which is the logit-normal (0, 1) of NVlabs'
Sana configs) shifted statically by the base scheduler's `flow_shift` (3.0 for the 1024 px models: what SanaPipeline
samples with, and NVlabs' training shift; SimpleTuner shifts by 3.0 too). diffusers' script draws u uniformly from a
FlowMatchEuler scheduler that reads no `flow_shift` (unshifted): not chosen, it trains the low-noise half that the
shifted sampler rarely visits. No loss weighting (every peer's default).
LoRA targets: diffusers' script default to_k, to_q, to_v (both attentions); presets name the other sets.
ComfyUI has no Sana LoRA key map (families-next.md 11): no ComfyUI layout is written.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from finetune.models.base import Components, unwrapped
from finetune.models.family import Family, FamilySpec
from finetune.models.flow_matching import FlowMatchingOptions
from finetune.recipe.schema import ModelOptions

# Gemma tokens per caption, in training and in sample grids: SanaPipeline.__call__'s default max_sequence_length
MAX_SEQUENCE_LENGTH = 300
ATTENTION = r"transformer_blocks\.\d+\.attn{}\.(to_q|to_k|to_v|to_out\.0)"
PRESETS = {
    "attention": (ATTENTION.format("[12]"),),  # both attentions' projections (SimpleTuner-style attention set)
    "self_attention": (ATTENTION.format("1"),),  # the image tokens' linear attention
    "cross_attention": (ATTENTION.format("2"),),  # the text-reading cross-attention
    # every Linear of the blocks (their MLP, GLUMBConv, is convolutions: not Linear)
    "all_linear": (r"transformer_blocks\.\d+\..+",),
}


@dataclass
class SanaOptions(ModelOptions, FlowMatchingOptions):
    """`model` for model.family sana: the common keys and `flow`."""

    def problems(self) -> list[str]:
        return self.objective_problems()


def instruction(pipeline_class: Any) -> list[str]:
    """The complex human instruction `__call__` prepends by default (what a user's pipeline samples with)."""
    return list(inspect.signature(pipeline_class.__call__).parameters["complex_human_instruction"].default or [])


class Sana(Family):
    def flow_defaults(self, flow: dict[str, Any], scheduler_config: Any) -> dict[str, Any]:
        """Sigmoid sampling shifted statically by the base scheduler's flow_shift (see the module docstring)."""
        shift = scheduler_config.get("flow_shift") or scheduler_config.get("shift") or 1.0
        return {"sigma_sampling": "sigmoid", "shift": float(shift), "resolution_shift": False}

    def encode_prompts(self, parts: Components, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(Gemma states [batch, 300, width], mask [batch, 300]) from the pipeline's encode_prompt with the CHI
        its __call__ prepends."""
        pipe = self.pipeline(parts)
        states, mask, *_ = pipe.encode_prompt(
            list(captions), do_classifier_free_guidance=False, device=self.text_device(parts),
            max_sequence_length=MAX_SEQUENCE_LENGTH, complex_human_instruction=instruction(type(pipe)))
        return states, mask

    def caption_window(self, tokenizer: Any, max_token_length: int | None) -> int:
        """The caption tokens kept after the CHI: MAX_SEQUENCE_LENGTH less the first token and CHI's last."""
        return MAX_SEQUENCE_LENGTH - 2

    def encode_image_moments(self, parts: Components, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The DC-AE's latent (deterministic: std 0)."""
        vae = parts.vae
        latent = vae.encode(pixels.to(vae.device, vae.dtype)).latent
        return latent, torch.zeros_like(latent)

    def predict(self, parts: Components, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: tuple[torch.Tensor, torch.Tensor], conditions: dict[str, torch.Tensor]
                ) -> torch.Tensor:
        """The velocity [B, C, h, w] for `noisy` latents at sigmas `timesteps` [B] in (0, 1), the transformer
        called as SanaPipeline's denoising loop calls it."""
        states, mask = conditioning
        transformer = parts.transformer
        config = unwrapped(transformer).config
        dtype = unwrapped(transformer).dtype
        return transformer(noisy.to(dtype), encoder_hidden_states=states.to(dtype),
                           encoder_attention_mask=mask.to(noisy.device),
                           timestep=(timesteps.float() * 1000) * config.timestep_scale, return_dict=False)[0]


def build_tiny(seed: int = 0) -> Any:
    """A SanaPipeline in miniature: a character-level Gemma tokenizer (bos added, right padding), a Gemma-2 of one
    layer 16 wide, a transformer of one block (2 heads of 4, cross-attention 2 heads of 4) on 4-channel latents, a
    DC-AE of three stages (4x down, so 32 px gives 8x8 latents; the released one is 32x), the released scheduler
    config (DPM-Solver++, flow sigmas, flow_shift 3.0). Resolution binning must be off below 1024 px."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import Gemma2Config, Gemma2Model, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    core = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(specials + ["\n"] + [chr(c) for c in
                                                                                        range(32, 127)])},
                                merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")  # one token per character
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                        bos_token="<bos>", unk_token="<unk>", model_max_length=2048,
                                        padding_side="right")
    text_encoder = Gemma2Model(Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=2048, pad_token_id=0, bos_token_id=2,
        eos_token_id=1, attn_implementation="eager"))
    transformer = SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2, attention_head_dim=4,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=16,
        sample_size=8)
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2,
        encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
        encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
        encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1), downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=0.41407)
    scheduler = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", flow_shift=3.0, use_flow_sigmas=True,
                                            prediction_type="flow_prediction", solver_order=2)
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=scheduler)
    for part in (text_encoder, transformer, vae):
        part.eval()
    return pipe


SPEC = FamilySpec(
    name="sana", title="Sana", pipeline="SanaPipeline", objective="flow_matching",
    # train.compile: blocks; diffusers declares none for Sana's transformer
    compile_blocks=("SanaTransformerBlock",),
    objective_defaults=(
        "sigmoid(N(0, 1)) (NVlabs' logit-normal) shifted statically by the base scheduler's flow_shift (3.0 at "
        "1024 px: how SanaPipeline samples and NVlabs trains), no weighting: SimpleTuner's sigmoid + shift "
        "(diffusers' script trains unshifted uniform sigmas)"),
    options=SanaOptions, behaviour=Sana, tiny=build_tiny,
    single_file_keys=("attention_y_norm.", "blocks.0.cross_attn.q_linear."),  # NVlabs' names; PixArt has no y norm
    lora_targets=("to_k", "to_q", "to_v"),  # train_dreambooth_lora_sana.py's --lora_layers default
    lora_target_presets=PRESETS,
    text_encoder_lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
    adapted_text_encoders=("text_encoder",),
    # hypernetwork: None = cross-attention (A1111's design): Sana's attn2 reads the caption alone (to_k / to_v on
    # the projected Gemma states), found by its is_cross_attention flag; a TextStream (a path prefix) cannot name
    # attn2 without attn1, the image tokens' self-attention
    refuses={"textual_inversion": "its text encoder is Gemma-2, SanaPipeline has no embedding loader and no "
                                  "embedding file layout is defined for it",
             "lora.text_encoder": "SanaPipeline.load_lora_weights loads the transformer's LoRA only "
                                  "(SanaLoraLoaderMixin): the file would not load in diffusers",
             "hypernetwork.a1111_pt": "AUTOMATIC1111 has no Sana; hypernetwork.safetensors loads with "
                                      "finetune.load_adapter"},
    kohya_prefixes={"transformer": "lora_unet"},
    kohya_unet_layout="none",
    kohya_base_model_version="sana",
    modelspec_architecture=None,
    comfyui_names=None)  # ComfyUI has no Sana LoRA key map (comfy/lora.py): the diffusers file is the one
