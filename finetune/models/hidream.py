"""HiDream-I1 (Full, Dev, Fast): a double- and single-stream transformer with MoE feed-forwards
(`HiDreamImageTransformer2DModel`, 16 + 32 blocks) on Flux's 16-channel VAE latents, conditioned by four text
encoders: CLIP-L and CLIP-G (`CLIPTextModelWithProjection`, pooled, concatenated), T5-XXL and Llama-3.1-8B-Instruct
(every layer's hidden states); trained with flow matching (finetune/models/flow_matching.py).

As diffusers' HiDreamImagePipeline and train_dreambooth_lora_hidream.py do:
- conditioning is the pipeline's own `encode_prompt` (the caption in all four prompt slots, every encoder padded to
  MAX_SEQUENCE_LENGTH 128, no masks): T5's last state [B, 128, 4096], Llama's `hidden_states[1:]` stacked
  layer-first `(layers, B, 128, 4096)`, the pooled CLIP-L || CLIP-G projections [B, 2048]. The loop keeps batch-first
  tensors, so `encode_prompts` moves Llama's batch axis first `(B, layers, 128, 4096)` and `predict` moves it back;
- the transformer takes latents [B, C, h, w] and patchifies them itself (2x2), with `timesteps = sigma x 1000` (the
  scheduler's timestep, not /1000); it returns `x0 - noise` and the pipeline negates it before the Euler step, so
  `predict` negates it too: the loop regresses the velocity `noise - x0`, as on every flow family;
- in train() mode the released transformer unpatchifies to `(B, C, S, p^2)` and routes its MoE another way unless
  built with `force_inference_output=True` (the script builds it so; the released config lacks it): `load` sets it
  on the loaded transformer, so training mode returns what inference returns (the routed experts then run under
  diffusers' `@torch.no_grad` moe_infer: no LoRA learns there, diffusers PR #11281's "MoE training disabled");
- `__call__` rescales any size to the area (default_sample_size x 8)^2; `default_sample_size` is an attribute, not
  saved, so `pipeline` reads it from the transformer's `max_resolution` (latent px: 128 = 1024 px when released);
- Flux's VAE: `(z - shift_factor) x scaling_factor` from its config (the shared path).
Sigma defaults: uniform u, static shift 3.0, no weighting: diffusers' script (its scheduler loaded with shift=3.0,
--weighting_scheme none) and ai-toolkit's HiDream example; HiDream-I1-Full samples with flow shift 3.0 (its UniPC
scheduler; Fast 3.0, Dev 6.0), and the pipeline's mu goes to schedulers without dynamic shifting, so no resolution
shift. LoRA targets: the script's `to_k, to_q, to_v, to_out` (attn1's image projections in both block kinds; the
`*_t` text projections and the MoE experts untouched); presets: OneTrainer's `attn1`, `ff_i` sets.
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

MAX_SEQUENCE_LENGTH = 128  # every encoder's tokens per caption: the pipeline's and the script's default
SHIFT = 3.0  # the static sigma shift (module docstring)
BLOCKS = r"(double|single)_stream_blocks\.\d+\.block\."
PRESETS = {
    # OneTrainer's `attn1`: every projection of the blocks' attention (the image's and, in the double blocks, the
    # text's *_t)
    "attn1": (BLOCKS + r"attn1\.(to_q|to_k|to_v|to_out)(_t)?",),
    # OneTrainer's `attn1, ff_i`: and the image stream's feed-forward, as far as it trains: the shared expert (the
    # routed experts run under no_grad with force_inference_output, see above)
    "attn1-ff_i": (BLOCKS + r"attn1\.(to_q|to_k|to_v|to_out)(_t)?", BLOCKS + r"ff_i\.(shared_experts\.)?w[123]"),
}


@dataclass
class HiDreamOptions(ModelOptions, FlowMatchingOptions):
    """`model` for model.family hidream: the common keys and `flow` (no guidance input: CFG is sampling's)."""

    def problems(self) -> list[str]:
        return self.objective_problems()


class HiDream(Family):
    def load(self, base: str, **kwargs: Any) -> Components:
        """The frozen base, its transformer switched to the inference output layout in train() mode too (the
        diffusers script's `force_inference_output=True`; set on the config and every block that reads it)."""
        parts = super().load(base, **kwargs)
        transformer = unwrapped(parts.transformer)
        transformer.register_to_config(force_inference_output=True)
        for module in transformer.modules():
            if hasattr(module, "_force_inference_output"):
                module._force_inference_output = True
        return parts

    def pipeline(self, parts: Components, unwrap: Any = None) -> Any:
        pipe = super().pipeline(parts, unwrap)
        # the pipeline's default area, an attribute save_pretrained drops: the transformer's largest latent side
        pipe.default_sample_size = int(unwrapped(parts.transformer).config.max_resolution[0])
        return pipe

    def flow_defaults(self, flow: dict[str, Any], scheduler_config: Any) -> dict[str, Any]:
        """Uniform sigma, static shift 3.0 (module docstring)."""
        return {"sigma_sampling": "uniform", "shift": SHIFT, "resolution_shift": False}

    def encode_prompts(self, parts: Components, captions: list[str]
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(T5 states [B, 128, T5 width], Llama's layers batch-first [B, layers, 128, Llama width], pooled CLIP-L ||
        CLIP-G [B, 2 x projection]) from the pipeline's encode_prompt."""
        t5, _, llama, _, pooled, _ = self.pipeline(parts).encode_prompt(
            prompt=list(captions), device=self.text_device(parts), do_classifier_free_guidance=False,
            max_sequence_length=MAX_SEQUENCE_LENGTH)
        return t5, llama.transpose(0, 1).contiguous(), pooled

    def caption_window(self, tokenizer: Any, max_token_length: int | None) -> int:
        """The caption tokens every encoder reads: MAX_SEQUENCE_LENGTH less the first tokenizer's own (CLIP's
        start and end)."""
        return MAX_SEQUENCE_LENGTH - len(tokenizer("").input_ids)

    def predict(self, parts: Components, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: tuple[torch.Tensor, torch.Tensor, torch.Tensor], conditions: dict[str, torch.Tensor]
                ) -> torch.Tensor:
        """The velocity `noise - x0` [B, C, h, w] for `noisy` latents at sigmas `timesteps` [B] in (0, 1): the
        transformer called as the pipeline's denoising loop calls it (timesteps sigma x 1000 in float32, Llama's
        layers first), its output negated as the loop negates it."""
        t5, llama, pooled = conditioning
        transformer = parts.transformer
        dtype = unwrapped(transformer).dtype
        height, width = noisy.shape[-2:]
        if height % 2 or width % 2:
            raise ValueError(f"HiDream patchifies latents 2x2; a {height}x{width} latent cannot be: use image sides "
                             "(and bucket sides) that are multiples of 16 px")
        out = transformer(hidden_states=noisy.to(dtype), timesteps=timesteps.float() * 1000,
                          encoder_hidden_states_t5=t5.to(dtype),
                          encoder_hidden_states_llama3=llama.to(dtype).transpose(0, 1),
                          pooled_embeds=pooled.to(dtype), return_dict=False)[0]
        return -out


def _llama_tokenizer() -> Any:
    """A character-level fast tokenizer with Llama 3's special tokens, `<|begin_of_text|>` put in front (the
    pipeline pads with `<|end_of_text|>`, its eos), 128 tokens."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    core = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(chars)}, merges=[], unk_token=None))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.add_special_tokens([AddedToken(t, special=True) for t in
                             ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")])
    bos = "<|begin_of_text|>"
    core.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, len(chars))])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token="<|end_of_text|>",
                                   pad_token="<|end_of_text|>", model_max_length=MAX_SEQUENCE_LENGTH,
                                   padding_side="right")


def build_tiny(seed: int = 0) -> Any:
    """A HiDreamImagePipeline in miniature: CLIP-L and CLIP-G 32 wide with projections (pooled 64), T5 32 wide, a
    Llama of 2 layers 16 wide (both read: llama_layers (0, 1)), a transformer of one double and one single block
    (4 heads of 8, RoPE axes 4+2+2, 4 experts, 2 active) on Flux's VAE (4 channels, 4x down here), built without
    force_inference_output as released; max_resolution 8 latent px, so sampling's default area is 32 px."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline, HiDreamImageTransformer2DModel
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune.models.tiny_clip import build_tokenizer, clip_text_model
    from finetune.models.tiny_transformers import _t5, _vae, build_t5_tokenizer

    torch.manual_seed(seed)
    clip_l, clip_g = build_tokenizer(MAX_SEQUENCE_LENGTH), build_tokenizer(MAX_SEQUENCE_LENGTH, pad_token="!")
    t5_tokenizer, llama_tokenizer = build_t5_tokenizer(MAX_SEQUENCE_LENGTH), _llama_tokenizer()
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(llama_tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, attention_dropout=0.0,
        bos_token_id=llama_tokenizer.bos_token_id, eos_token_id=llama_tokenizer.eos_token_id,
        pad_token_id=llama_tokenizer.pad_token_id))
    transformer = HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=4, caption_channels=[32, 16], text_emb_dim=64, num_routed_experts=4,
        num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(8, 8), llama_layers=[0, 1])
    pipe = HiDreamImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT), vae=_vae(shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=clip_text_model(clip_l, 32, with_projection=True), tokenizer=clip_l,
        text_encoder_2=clip_text_model(clip_g, 32, with_projection=True), tokenizer_2=clip_g,
        text_encoder_3=_t5(t5_tokenizer, 32), tokenizer_3=t5_tokenizer, text_encoder_4=llama,
        tokenizer_4=llama_tokenizer, transformer=transformer)
    for part in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, llama, transformer, pipe.vae):
        part.eval()
    pipe.default_sample_size = 8
    return pipe


SPEC = FamilySpec(
    name="hidream", title="HiDream-I1", pipeline="HiDreamImagePipeline", objective="flow_matching",
    # train.compile: blocks; diffusers declares none for HiDream's transformer. Its blocks route tokens to experts
    # by data-dependent indexing, which no graph holds: the attention layers and each expert's feed-forward compile
    compile_blocks=("HiDreamAttention", "HiDreamImageFeedForwardSwiGLU"),
    offload_blocks=("HiDreamBlock",),
    objective_defaults=(
        "uniform, static shift 3.0, no weighting: diffusers' train_dreambooth_lora_hidream.py (scheduler loaded "
        "with shift=3.0, --weighting_scheme none) and ai-toolkit's HiDream example; HiDream-I1-Full samples with "
        "flow shift 3.0"),
    options=HiDreamOptions, behaviour=HiDream, tiny=build_tiny,
    # the original names are diffusers' (diffusers' convert_hidream_transformer_to_diffusers only strips a prefix)
    single_file_keys=("double_stream_blocks.", "single_stream_blocks.", "caption_projection."),
    lora_targets=("to_k", "to_q", "to_v", "to_out"),
    lora_target_presets=PRESETS,
    text_encoder_lora_targets=("q_proj", "k_proj", "v_proj", "out_proj"),  # CLIP's attention
    adapted_text_encoders=("text_encoder", "text_encoder_2"),  # CLIP-L and CLIP-G; T5 and Llama left as they are
    # the double blocks project the text tokens to keys and values alone (HiDreamAttnProcessor's to_k_t / to_v_t on
    # encoder_hidden_states); the single blocks project text and image tokens together
    hypernetwork_text_stream=TextStream(layers="double_stream_blocks.", keys="to_k_t", values="to_v_t"),
    refuses={"textual_inversion": "CLIP-L and CLIP-G reach the transformer only as the pooled vector added to its "
                                  "timestep embedding (T5 and Llama read the placeholder as typed): the learned "
                                  "vectors do not lower the loss in finetune's strategy contract",
             "lora.text_encoder": "HiDreamImagePipeline.load_lora_weights loads the transformer's layers only: "
                                  "the file would not load in diffusers"},
    kohya_prefixes={"transformer": "lora_unet"},
    kohya_unet_layout="none",
    kohya_base_model_version="hidream",
    # ComfyUI reads diffusion_model. + diffusers' names (ComfyUI PR #8318); so does diffusers'
    # _convert_non_diffusers_hidream_lora_to_diffusers
    comfyui_names=OriginalNames(),
    modelspec_architecture=None)
