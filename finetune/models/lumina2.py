"""Lumina 2 (Alpha-VLLM/Lumina-Image-2.0): a single-stream NextDiT (`Lumina2Transformer2DModel`, 26 layers 2304 wide,
GQA 24/8 heads, two noise-refiner and two context-refiner blocks) on Flux's 16-channel VAE latents in 2x2 patches
(patchified inside the transformer), conditioned by Gemma-2-2B (`text_encoder`), trained with flow matching.

What the pipeline does, and so what training does (diffusers' Lumina2Pipeline):
- conditioning is the pipeline's own `encode_prompt`: `system_prompt + " <Prompt Start> " + caption` (the pipeline's
  default system prompt), tokenized to 256 tokens, Gemma's second-to-last hidden states and the tokenizer's mask;
  `encode_prompts` returns both, `predict` hands them to the transformer as the denoising loop does;
- time runs from noise (0) to image (1): the transformer gets `1 - t / 1000` of the scheduler's `t = sigma x 1000`
  and predicts `x0 - noise`, which the pipeline negates before the Euler step. `predict` negates it likewise, so
  the loop regresses the velocity `noise - x0` as for every flow family, and sampling uses what was trained;
- latents are `(z - shift_factor) x scaling_factor` (the VAE config's, Flux's 0.1159 and 0.3611); 4-D in and out.
Sampling: sample.guidance_scale with the pipeline's own cfg_trunc_ratio (1.0) and cfg_normalization (on).

Sigma defaults: `sigmoid` sampling (u = sigmoid(N(0, 1)), SimpleTuner's) shifted statically by the base's scheduler
config, the shift Lumina2Pipeline samples with (a config with dynamic shifting gets the resolution shift).
diffusers' train_dreambooth_lora_lumina2.py draws u uniformly and indexes the shifted scheduler sigmas, but uses
them as the *image's* weight (its reversed lerp), so it trains mostly the low-noise end the sampler spends few
steps on: not taken. ai-toolkit's `lumina2_shift` is Flux.1's resolution shift, not this base's config. No loss
weighting (every peer's default). LoRA targets: the diffusers script's to_q, to_k, to_v, to_out.0 (every block:
refiners and main layers); SimpleTuner's extra `to_qkv` names no diffusers module. Presets below.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from finetune.models.base import Components, unwrapped
from finetune.models.family import Family, FamilySpec, OriginalNames
from finetune.models.flow_matching import FlowMatchingOptions
from finetune.networks.hypernetwork_points import TextStream
from finetune.recipe.schema import ModelOptions

# Gemma tokens per prompt (system prompt included), in training and in sample grids: Lumina2Pipeline's default
MAX_SEQUENCE_LENGTH = 256
# Lumina2Pipeline's own system prompt (its __init__'s), and what encode_prompt joins it to the caption with
SYSTEM_PROMPT = ("You are an assistant designed to generate superior images with the superior degree of image-text "
                 "alignment based on textual prompts or user prompts.")
PROMPT_START = " <Prompt Start> "
BLOCKS = r"(layers|noise_refiner|context_refiner)\.\d+\."
PRESETS = {
    "attention": (BLOCKS + r"attn\.(to_q|to_k|to_v|to_out\.0)",),  # diffusers' and SimpleTuner's set
    # the attention and the SwiGLU feed-forward (the original's attention.qkv / out and feed_forward.w1-w3)
    "attention_mlp": (BLOCKS + r"attn\.(to_q|to_k|to_v|to_out\.0)", BLOCKS + r"feed_forward\.linear_[123]"),
    # every Linear of the blocks, the modulation (norm1.linear, the original's adaLN_modulation.1) included
    "all_linear": (BLOCKS + r".+",),
}
_BLOCK_NAMES = {"attn.to_out.0": "attention.out", "feed_forward.linear_1": "feed_forward.w1",
                "feed_forward.linear_2": "feed_forward.w2", "feed_forward.linear_3": "feed_forward.w3",
                "norm1.linear": "adaLN_modulation.1"}
# the original (Alpha-VLLM) names ComfyUI reads, from diffusers' convert_lumina2_to_diffusers and
# _convert_non_diffusers_lumina2_lora_to_diffusers: q, k, v fused in that order into attention.qkv
COMFYUI_NAMES = OriginalNames(
    blocks={name: name for name in ("layers", "noise_refiner", "context_refiner")},
    renamed={name: _BLOCK_NAMES for name in ("layers", "noise_refiner", "context_refiner")},
    fused={name: {"attention.qkv": ("attn.to_q", "attn.to_k", "attn.to_v")}
           for name in ("layers", "noise_refiner", "context_refiner")},
    widths={"attn.to_k": 1 / 3, "attn.to_v": 1 / 3},  # 8 key/value heads of 24: 768 of 2304
    top={"x_embedder": "x_embedder", "time_caption_embed.caption_embedder.1": "cap_embedder.1",
         "time_caption_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
         "time_caption_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
         "norm_out.linear_1": "final_layer.adaLN_modulation.1", "norm_out.linear_2": "final_layer.linear"})


@dataclass
class Lumina2Options(ModelOptions, FlowMatchingOptions):
    """`model` for model.family lumina2: the common keys and `flow`."""

    def problems(self) -> list[str]:
        return self.objective_problems()


class Lumina2(Family):
    def flow_defaults(self, flow: dict[str, Any], scheduler_config: Any) -> dict[str, Any]:
        """Sigmoid sampling shifted as the base's scheduler config shifts (see the module docstring)."""
        dynamic = bool(scheduler_config.get("use_dynamic_shifting", False))
        return {"sigma_sampling": "sigmoid", "shift": None if dynamic else scheduler_config.get("shift", 1.0),
                "resolution_shift": dynamic and flow.get("shift") is None}

    def encode_prompts(self, parts: Components, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(Gemma states [batch, 256, width], the tokenizer's mask [batch, 256]) from the pipeline's encode_prompt,
        the system prompt put before each caption there."""
        states, mask, *_ = self.pipeline(parts).encode_prompt(
            list(captions), do_classifier_free_guidance=False, device=self.text_device(parts),
            max_sequence_length=MAX_SEQUENCE_LENGTH)
        return states, mask

    def caption_window(self, tokenizer: Any, max_token_length: int | None) -> int:
        """The caption tokens that fit in MAX_SEQUENCE_LENGTH after the system prompt."""
        return MAX_SEQUENCE_LENGTH - len(tokenizer(SYSTEM_PROMPT + PROMPT_START).input_ids)

    def predict(self, parts: Components, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: tuple[torch.Tensor, torch.Tensor], conditions: dict[str, torch.Tensor]
                ) -> torch.Tensor:
        """The velocity `noise - x0` [B, C, h, w] for `noisy` latents at sigmas `timesteps` [B] in (0, 1): the
        transformer called as Lumina2Pipeline's denoising loop calls it (time reversed), its output negated."""
        states, mask = conditioning
        transformer = parts.transformer
        dtype = unwrapped(transformer).dtype
        height, width = noisy.shape[-2:]
        if height % 2 or width % 2:
            raise ValueError(f"Lumina 2 patchifies latents 2x2; a {height}x{width} latent cannot be: use image "
                             "sides (and bucket sides) that are multiples of 16 px")
        out = transformer(hidden_states=noisy.to(dtype), timestep=1 - (timesteps.float() * 1000) / 1000,
                          encoder_hidden_states=states.to(dtype), encoder_attention_mask=mask.to(noisy.device),
                          return_dict=False)[0]
        return -out


def build_tiny(seed: int = 0) -> Any:
    """A Lumina2Pipeline in miniature: a character-level Gemma tokenizer (256 tokens), a 2-layer Gemma-2 16 wide, a
    NextDiT 24 wide (3 heads of 8 with 1 key/value head: q, k, v widths 3:1:1 as the released 24/8) with one block
    of each kind on Flux's VAE (4 channels, 8x down); a static shift of 6. 32 px: 4x4 latents, 4 tokens."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Gemma2Config, Gemma2Model, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    core = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(specials + [chr(c) for c in range(32, 127)])},
                                merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")  # one token per character
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                        bos_token="<bos>", unk_token="<unk>", model_max_length=MAX_SEQUENCE_LENGTH)
    text_encoder = Gemma2Model(Gemma2Config(
        head_dim=8, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
        num_key_value_heads=1, vocab_size=len(tokenizer), max_position_embeddings=512, pad_token_id=0,
        attn_implementation="eager"))
    transformer = Lumina2Transformer2DModel(
        sample_size=4, patch_size=2, in_channels=4, hidden_size=24, num_layers=1, num_refiner_layers=1,
        num_attention_heads=3, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 2, 2), axes_lens=(300, 64, 64),
        cap_feat_dim=16)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16, 16),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=8, sample_size=32, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)
    pipe = Lumina2Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=6.0), vae=vae,
                           text_encoder=text_encoder, tokenizer=tokenizer)
    for part in (text_encoder, transformer, vae):
        part.eval()
    return pipe


SPEC = FamilySpec(
    name="lumina2", title="Lumina 2", pipeline="Lumina2Pipeline", objective="flow_matching",
    # train.compile: blocks; diffusers declares none for Lumina 2's transformer (its refiners are blocks of the same class)
    compile_blocks=("Lumina2TransformerBlock",),
    objective_defaults=(
        "sigmoid(N(0, 1)) with the base scheduler config's static shift (the one Lumina2Pipeline samples with), no "
        "weighting: SimpleTuner's sigmoid + shift; diffusers' script (uniform on its reversed lerp) trains the "
        "low-noise end, ai-toolkit's lumina2_shift is Flux.1's resolution shift"),
    options=Lumina2Options, behaviour=Lumina2, tiny=build_tiny,
    # the original checkpoint's caption embedder and refiners; adaLN_modulation.1 (SiLU, Linear) tells it from
    # Z-Image's original layout, whose modulation is adaLN_modulation.0
    single_file_keys=("cap_embedder.", "context_refiner.", "noise_refiner.", "layers.0.adaLN_modulation.1."),
    lora_targets=("to_q", "to_k", "to_v", "to_out.0"),
    lora_target_presets=PRESETS,
    text_encoder_lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),  # Gemma-2's attention
    adapted_text_encoders=("text_encoder",),
    # the context_refiner blocks attend over the caption tokens alone (to_k / to_v read the text only) before they
    # join the image tokens; the main layers read both, the noise_refiner the image only
    hypernetwork_text_stream=TextStream(layers="context_refiner.", keys="to_k", values="to_v"),
    refuses={"textual_inversion": "its text encoder is Gemma-2, its diffusers pipeline has no embedding loader and "
                                  "no embedding file layout is defined for it",
             # Lumina2LoraLoaderMixin._lora_loadable_modules is ["transformer"]
             "lora.text_encoder": "Lumina2Pipeline.load_lora_weights loads the transformer's layers only: the "
                                  "Gemma layers would not load in diffusers"},
    kohya_prefixes={"transformer": "lora_unet"},
    kohya_unet_layout="none",
    kohya_base_model_version="lumina2",
    kohya_network_module="networks.lora_lumina",  # sd-scripts' lumina_train_network.py
    modelspec_architecture="lumina-2",  # sd-scripts' sai_model_spec ARCH_LUMINA_2
    comfyui_names=COMFYUI_NAMES)
