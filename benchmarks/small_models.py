"""The small models benchmarks/activations.py measures: for each family (`FAMILIES`) a narrow copy of its diffusers
transformer (the real block design and head size, 2 heads or the family's grouped-query ratio, one block of each
kind), the inputs its training hands it, and the LoRA targets the measurement trains (the family's defaults)."""
from __future__ import annotations

import torch

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


def _small_qwen_image_2_1():
    from diffusers import QwenImage21Transformer2DModel

    # 2.1's block design (single stream, 128-wide heads, SwiGLU 3 x width, one shared modulation), 64 unpacked channels
    return QwenImage21Transformer2DModel(in_channels=64, out_channels=64, num_layers=1, attention_head_dim=128,
                                         num_attention_heads=2, context_in_dim=32, axes_dims_rope=(16, 56, 56))


def _qwen_image_2_1_inputs(model, image_tokens: int, text_tokens: int) -> dict:
    side = int(image_tokens ** 0.5)  # one token per latent pixel; img_mask: one slot per 2x2 group after the text
    slots = torch.cat([torch.zeros(1, text_tokens), torch.ones(1, side * side // 4)], 1).bool()
    return {"hidden_states": torch.randn(1, side * side, 64), "encoder_hidden_states": torch.randn(1, text_tokens, 32),
            "timestep": torch.tensor([0.5]), "img_shapes": [[(1, side, side)]], "img_mask": slots}


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
    # Flux.1's blocks; the default targets add the single blocks' proj_mlp (finetune/models/flux_kontext.py)
    "flux_kontext": (_small_flux, _flux_inputs, (*FLUX_TARGETS, "proj_mlp")),
    "sd3": (_small_sd3, _sd3_inputs, SD3_TARGETS),
    "flux2": (_small_flux2, _flux2_inputs, FLUX2_TARGETS),
    "qwen_image": (_small_qwen_image, _qwen_image_inputs, QWEN_IMAGE_TARGETS),
    "chroma": (_small_chroma, _chroma_inputs, CHROMA_TARGETS),
    "lumina2": (_small_lumina2, _lumina2_inputs, LUMINA2_TARGETS),
    "sana": (_small_sana, _sana_inputs, SANA_TARGETS),
    "hidream": (_small_hidream, _hidream_inputs, HIDREAM_TARGETS),
    "krea2": (_small_krea2, _krea2_inputs, KREA2_TARGETS),
    "qwen_image_2_1": (_small_qwen_image_2_1, _qwen_image_2_1_inputs, QWEN_IMAGE_TARGETS),  # its single stream's
}
# HiDream's text arrives as three equal streams (T5, the last Llama layer, the block's own Llama layer)
TEXT_STREAMS = {"hidream": 3}
