"""Activation memory of a transformer block per token, measured on this CPU on a narrow copy of the real block.

What backward keeps: every tensor autograd saves while the denoiser runs forward (counted once per storage through
`torch.autograd.graph.saved_tensors_hooks`; the weights themselves left out), attributed to the block that was
running. The model is the family's diffusers class with the real head size (128 for Flux, Flux.2, Qwen-Image and
Chroma, 64 for SD3, 96 for Lumina 2, 32 / 112 for Sana's linear / cross attention, Krea 2's 128 at 12 / 3 heads)
but 2 heads (Lumina 2 3 / 1, Sana 7 / 2, Krea 2 12 / 3: their grouped-query ratios), a rank-1 LoRA on the family's default targets, bf16 weights under bf16 autocast
as the loop trains, and attention through SDPA's flash kernel (the one a GPU takes; it keeps q, k, v, the output
and a log-sum-exp, nothing quadratic in tokens). Every tensor a block saves is [tokens, k x width] (the
attention's log-sum-exp, [heads, tokens], is rounding), so bytes / (tokens x width) is a constant of the block's
design: `bytes_per_token_width`. A full-size block then keeps that x tokens x width x batch bytes; with gradient
checkpointing it keeps only its inputs (the hidden states, `KEPT_PER_TOKEN_WIDTH` bytes per token and width in
bf16), and the one block being recomputed holds its full share again during backward.
Sana's ratios are per image token (`IMAGE_TOKENS_ONLY`: the caption is cross attention's keys and values only);
Lumina 2's refiners and Krea 2's text fusion, which diffusers does not checkpoint, are in "rest" (per image token:
Krea 2's measured at 1024 px's text share, `MEASURE_TOKENS`, so more per image token at smaller sides); HiDream's
MoE feed-forward runs its training path (every token through its 2 routed experts and the shared one).
Masks: none here (Lumina 2's context refiner gets an all-true caption mask). Qwen-Image's predict passes none when no caption in the batch is padded (batch 1). Chroma's
training gives every block a [batch, 1, tokens, tokens] mask (real caption tokens plus one pad): attention then
runs without the flash kernel and may keep that mask for backward, about 42 MB a block in bf16 at 1024 px, not in
the ratios (with gradient checkpointing, one block's).
"""
from __future__ import annotations

import torch

KEPT_PER_TOKEN_WIDTH = 2  # a checkpointed block keeps its input hidden states: one bf16 value per token and width


def _small_flux():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                  attention_head_dim=128, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=[16, 56, 56])


def _flux_inputs(model, image_tokens: int, text_tokens: int) -> dict:
    from diffusers import FluxPipeline

    side = int(image_tokens ** 0.5)
    return {"hidden_states": torch.randn(1, side * side, 64), "encoder_hidden_states": torch.randn(1, text_tokens, 32),
            "pooled_projections": torch.randn(1, 16), "timestep": torch.tensor([0.5]),
            "guidance": torch.tensor([1.0]), "txt_ids": torch.zeros(text_tokens, 3),
            "img_ids": FluxPipeline._prepare_latent_image_ids(1, side, side, "cpu", torch.float32)}


def _small_sd3():
    from diffusers import SD3Transformer2DModel

    # a block with SD3.5 Medium's second image attention, a plain one, and the last (context_pre_only) one
    return SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=3,
                                 attention_head_dim=64, num_attention_heads=2, joint_attention_dim=32,
                                 caption_projection_dim=128, pooled_projection_dim=16, pos_embed_max_size=16,
                                 qk_norm="rms_norm", dual_attention_layers=(0,))


def block_kinds(model) -> list[tuple[str, torch.nn.Module]]:
    """(kind, block) for every checkpointed block of a transformer in the order they run: Flux's, Flux.2's and
    Chroma's "double" and "single"; SD3 "dual" (SD3.5 Medium's first 13), "joint", and "last" (its context stream
    ends there); Qwen-Image's 60 alike dual-stream blocks, Sana's 20, Krea 2's 28 single-stream ones and Lumina 2's 26
    joint layers "joint" (its 2 + 2 refiner blocks, which diffusers does not checkpoint, count as "rest"); HiDream's
    "double" and "single" stream blocks."""
    if hasattr(model, "double_stream_blocks"):  # HiDream
        return ([("double", b) for b in model.double_stream_blocks]
                + [("single", b) for b in model.single_stream_blocks])
    if hasattr(model, "noise_refiner"):  # Lumina 2
        return [("joint", b) for b in model.layers]
    if hasattr(model, "single_transformer_blocks"):
        return ([("double", b) for b in model.transformer_blocks]
                + [("single", b) for b in model.single_transformer_blocks])
    if "dual_attention_layers" not in model.config:  # Qwen-Image: one kind of block, both streams to the end
        return [("joint", b) for b in model.transformer_blocks]
    dual = set(model.config.dual_attention_layers or ())
    blocks = model.transformer_blocks
    return [("last" if i == len(blocks) - 1 else "dual" if i in dual else "joint", b) for i, b in enumerate(blocks)]


def _sd3_inputs(model, image_tokens: int, text_tokens: int) -> dict:
    side = 2 * int(image_tokens ** 0.5)  # 2x2 patches
    return {"hidden_states": torch.randn(1, 16, side, side), "encoder_hidden_states": torch.randn(1, text_tokens, 32),
            "pooled_projections": torch.randn(1, 16), "timestep": torch.tensor([500.0])}


def _small_flux2():
    from diffusers import Flux2Transformer2DModel

    # dev's block design (klein's is the same: mlp_ratio 3, 128-wide heads, 4-axis RoPE), with its guidance input
    return Flux2Transformer2DModel(patch_size=1, in_channels=128, num_layers=1, num_single_layers=1,
                                   attention_head_dim=128, num_attention_heads=2, joint_attention_dim=32,
                                   mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), guidance_embeds=True)


def _flux2_inputs(model, image_tokens: int, text_tokens: int) -> dict:
    from diffusers import Flux2Pipeline

    side = int(image_tokens ** 0.5)
    text = torch.randn(1, text_tokens, 32)
    return {"hidden_states": torch.randn(1, side * side, 128), "encoder_hidden_states": text,
            "timestep": torch.tensor([0.5]), "guidance": torch.tensor([1.0]),
            "txt_ids": Flux2Pipeline._prepare_text_ids(text),
            "img_ids": Flux2Pipeline._prepare_latent_ids(torch.zeros(1, 128, side, side))}


def _small_qwen_image():
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=1,
                                       attention_head_dim=128, num_attention_heads=2, joint_attention_dim=32,
                                       axes_dims_rope=(16, 56, 56))


def _qwen_image_inputs(model, image_tokens: int, text_tokens: int) -> dict:
    side = int(image_tokens ** 0.5)  # packed 2x2 latents, side x side tokens
    return {"hidden_states": torch.randn(1, side * side, 64), "encoder_hidden_states": torch.randn(1, text_tokens, 32),
            "timestep": torch.tensor([0.5]), "img_shapes": [(1, side, side)]}


def _small_chroma():
    from diffusers import ChromaTransformer2DModel

    return ChromaTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                    attention_head_dim=128, num_attention_heads=2, joint_attention_dim=32,
                                    axes_dims_rope=(16, 56, 56), approximator_num_channels=16,
                                    approximator_hidden_dim=32, approximator_layers=1)


def _chroma_inputs(model, image_tokens: int, text_tokens: int) -> dict:
    from diffusers import ChromaPipeline

    side = int(image_tokens ** 0.5)
    return {"hidden_states": torch.randn(1, side * side, 64), "encoder_hidden_states": torch.randn(1, text_tokens, 32),
            "timestep": torch.tensor([0.5]), "txt_ids": torch.zeros(text_tokens, 3),
            "img_ids": ChromaPipeline._prepare_latent_image_ids(1, side, side, "cpu", torch.float32)}


def _small_lumina2():
    from diffusers import Lumina2Transformer2DModel

    # Lumina 2's head size (96) and 3:1 grouped-query heads; its MLP (8/3 x width, rounded to 256) keeps the ratio
    return Lumina2Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, hidden_size=288, num_layers=1,
                                     num_refiner_layers=1, num_attention_heads=3, num_kv_heads=1,
                                     axes_dim_rope=(32, 32, 32), cap_feat_dim=32)


def _lumina2_inputs(model, image_tokens: int, text_tokens: int) -> dict:
    side = 2 * int(image_tokens ** 0.5)  # 2x2 patches
    return {"hidden_states": torch.randn(1, 16, side, side), "timestep": torch.tensor([0.5]),
            "encoder_hidden_states": torch.randn(1, text_tokens, 32),
            "encoder_attention_mask": torch.ones(1, text_tokens, dtype=torch.bool)}


def _small_sana():
    from diffusers import SanaTransformer2DModel

    # Sana 1.6B's design at 224 wide: 7 linear-attention heads of 32, 2 cross-attention heads of 112, Mix-FFN 2.5
    return SanaTransformer2DModel(in_channels=32, out_channels=32, num_attention_heads=7, attention_head_dim=32,
                                  num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=112,
                                  cross_attention_dim=224, caption_channels=32, mlp_ratio=2.5, sample_size=8,
                                  patch_size=1)


def _sana_inputs(model, image_tokens: int, text_tokens: int) -> dict:
    side = int(image_tokens ** 0.5)  # 1x1 patches of the 32x DC-AE's latents
    return {"hidden_states": torch.randn(1, 32, side, side), "encoder_hidden_states": torch.randn(1, text_tokens, 32),
            "timestep": torch.tensor([500.0])}


def _small_hidream():
    from diffusers import HiDreamImageTransformer2DModel

    # HiDream's block design (128-wide heads, MoE with 4 routed experts, 2 active); force_inference_output as the
    # diffusers training script builds it
    return HiDreamImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=16, num_layers=1,
                                          num_single_layers=1, attention_head_dim=128, num_attention_heads=2,
                                          caption_channels=[32, 32], text_emb_dim=16, num_routed_experts=4,
                                          num_activated_experts=2, axes_dims_rope=(64, 32, 32),
                                          max_resolution=(32, 32), llama_layers=[0, 1], force_inference_output=True)


def _hidream_inputs(model, image_tokens: int, text_tokens: int) -> dict:
    side = 2 * int(image_tokens ** 0.5)
    each = text_tokens // TEXT_STREAMS["hidream"]  # T5's, the last Llama layer's and the block's Llama layer's
    return {"hidden_states": torch.randn(1, 16, side, side), "timesteps": torch.tensor([500.0]),
            "encoder_hidden_states_t5": torch.randn(1, each, 32),
            "encoder_hidden_states_llama3": torch.randn(2, 1, each, 32), "pooled_embeds": torch.randn(1, 16)}


def _small_krea2():
    from diffusers import Krea2Transformer2DModel

    # Krea 2's proportions at 1536 wide: 12 query / 3 key-value heads of 128, MLP 8/3 x width, the text fusion 5/12
    # of the width (2560 / 6144) over 12 taps
    return Krea2Transformer2DModel(in_channels=64, num_layers=1, attention_head_dim=128, num_attention_heads=12,
                                   num_key_value_heads=3, intermediate_size=4096, text_hidden_dim=640,
                                   num_text_layers=12, text_num_attention_heads=5, text_num_key_value_heads=5,
                                   text_intermediate_size=1728)


def _krea2_inputs(model, image_tokens: int, text_tokens: int) -> dict:
    side = int(image_tokens ** 0.5)  # packed 2x2 latents
    grid = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    ids = torch.cat([torch.zeros(text_tokens, 3), torch.cat([torch.zeros(side * side, 1), grid], 1)]).long()
    return {"hidden_states": torch.randn(1, side * side, 64), "encoder_hidden_states": torch.randn(1, text_tokens, 12, 640),
            "timestep": torch.tensor([0.5]), "position_ids": ids}


FLUX_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                "ff_context.net.2")
SD3_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
               "attn.add_v_proj", "attn.to_add_out")
# the new families' default LoRA targets (their FamilySpec.lora_targets; the small Flux.2 has one single block)
FLUX2_TARGETS = ("to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj", "single_transformer_blocks.0.attn.to_out")
QWEN_IMAGE_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
CHROMA_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0")
# Lumina 2, Sana, HiDream, Krea 2: the attention projections (families-next.md section 11; HiDream's image stream)
LUMINA2_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
SANA_TARGETS = ("to_q", "to_k", "to_v")
HIDREAM_TARGETS = ("to_q", "to_k", "to_v", "to_out")
KREA2_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # its text fusion's attention too (the same names)

# family -> (its small model, its inputs, the LoRA targets the measurement trains)
FAMILIES = {
    "flux": (_small_flux, _flux_inputs, FLUX_TARGETS),
    "sd3": (_small_sd3, _sd3_inputs, SD3_TARGETS),
    "flux2": (_small_flux2, _flux2_inputs, FLUX2_TARGETS),
    "qwen_image": (_small_qwen_image, _qwen_image_inputs, QWEN_IMAGE_TARGETS),
    "chroma": (_small_chroma, _chroma_inputs, CHROMA_TARGETS),
    "lumina2": (_small_lumina2, _lumina2_inputs, LUMINA2_TARGETS),
    "sana": (_small_sana, _sana_inputs, SANA_TARGETS),
    "hidream": (_small_hidream, _hidream_inputs, HIDREAM_TARGETS),
    "krea2": (_small_krea2, _krea2_inputs, KREA2_TARGETS),
}
# Sana's blocks hold the image tokens alone (the caption enters as cross attention's keys and values): its ratios
# are per image token
IMAGE_TOKENS_ONLY = {"sana"}
# HiDream's text arrives as three equal streams (T5, the last Llama layer, the block's own Llama layer)
TEXT_STREAMS = {"hidream": 3}
# (image, text) tokens of the measurement where "rest" holds work on the text alone, counted per image token: Krea 2's
# text fusion (LoRA reaches its attention: the same names), measured at 1024 px's share (4096 image, 512 text)
MEASURE_TOKENS = {"krea2": (64, 8)}


def block_tokens(family: str, image_tokens: int, text_tokens: int) -> int:
    """The tokens a block of `family` holds: both streams', or the image's alone (`IMAGE_TOKENS_ONLY`)."""
    return image_tokens if family in IMAGE_TOKENS_ONLY else image_tokens + text_tokens


def measure(family: str, image_tokens: int | None = None, text_tokens: int | None = None) -> dict[str, float]:
    """{block kind (`block_kinds`): saved bytes per token per unit of width}, tokens of both streams, for a
    transformer of one of `FAMILIES`, plus "rest": what the embedders and output layers save, in bytes per image token
    per unit of width."""
    from peft import LoraConfig

    from finetune.networks import peft_layers

    default = MEASURE_TOKENS.get(family, (64, 32))
    image_tokens, text_tokens = image_tokens or default[0], text_tokens or default[1]
    torch.manual_seed(0)
    small, inputs, targets = FAMILIES[family]
    model = small()
    model.requires_grad_(False)
    peft_layers.inject(model, LoraConfig(r=1, lora_alpha=1, target_modules=list(targets)))
    model.to(torch.bfloat16)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    from benchmarks.meta_models import width as _width

    width = _width(model)
    weights = {p.data_ptr() for p in model.parameters()}
    current, saved, seen = ["rest"], {}, set()

    def pack(tensor):
        key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if key[0] not in weights and key not in seen:
            seen.add(key)
            saved[current[0]] = saved.get(current[0], 0) + key[1]
        return tensor

    blocks = block_kinds(model)
    for kind, block in blocks:
        block.register_forward_pre_hook(lambda *_, k=kind: current.__setitem__(0, k))
        block.register_forward_hook(lambda *_: current.__setitem__(0, "rest"))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    args = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() and k != "guidance" else v
            for k, v in inputs(model, image_tokens, text_tokens).items()}
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cpu", dtype=torch.bfloat16), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**args, return_dict=False)[0].float().pow(2).mean()
    text_tokens -= text_tokens % TEXT_STREAMS.get(family, 1)  # the tokens the inputs gave it
    tokens = block_tokens(family, image_tokens, text_tokens)
    result = {kind: saved[kind] / (tokens * width) / sum(k == kind for k, _ in blocks) for kind, _ in blocks}
    result["rest"] = saved.get("rest", 0) / (image_tokens * width)
    return result
