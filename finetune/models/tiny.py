"""A tiny Stable Diffusion pipeline built from configs (no downloads), for tests, benchmarks and quick tries.

The tokenizer is character-level CLIP BPE (byte alphabet, no merges), so any prompt tokenizes (tiny_clip.py).
"""
from __future__ import annotations

from pathlib import Path

import torch

from finetune.models.tiny_clip import build_tokenizer, clip_text_model


def build_tiny_pipeline(seed: int = 0, cross_attention_dim: int = 32):
    """A StableDiffusionPipeline with a few hundred thousand random parameters; 32 px images, 8x8 latents."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cross_attention_dim, intermediate_size=2 * cross_attention_dim,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=cross_attention_dim))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=8, sample_size=32)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def build_tiny_sdxl_pipeline(seed: int = 0, force_upcast: bool = True):
    """A StableDiffusionXLPipeline of the same build as the released one, in miniature: CLIP-L 16 wide and CLIP-G
    32 wide with a projection, a U-Net attending to both (48 wide) with SDXL's text_time embedding (6 size numbers
    x 8 + the pooled 32), linear projections and two transformer layers in the inner block; 32 px images."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = build_tokenizer(), build_tokenizer(pad_token="!")
    text_encoder = clip_text_model(tokenizer, 16)
    text_encoder_2 = clip_text_model(tokenizer_2, 32, with_projection=True)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        cross_attention_dim=16 + 32, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=8, sample_size=32, force_upcast=force_upcast, scaling_factor=0.13025)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)


def save_tiny_pipeline(folder: str | Path, seed: int = 0, family: str = "sd") -> Path:
    """Write a tiny pipeline of `family` (a registered family's name: its spec's `tiny` builds it) as a
    diffusers folder."""
    from finetune.models import spec_of
    from finetune.paths import give_umask_permissions

    folder = Path(folder)
    spec_of(family).tiny(seed).save_pretrained(folder, safe_serialization=True)
    give_umask_permissions(folder)
    return folder


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m finetune.models.tiny",
                                     description="Write a tiny random pipeline of a model family (a test model).")
    parser.add_argument("folder", nargs="?", default="outputs/tiny-sd", help="where to write it (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    from finetune.models import specs

    parser.add_argument("--family", choices=list(specs()), default="sd", help="model family (default sd)")
    args = parser.parse_args()
    from finetune import console

    console.configure()  # the libraries' warnings that do not apply stay out of the way, as in the CLI
    print(f"wrote {save_tiny_pipeline(args.folder, args.seed, args.family)}")
