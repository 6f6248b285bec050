"""Model and data the benchmarks run on: the tiny test pipeline, or the SD1.5 or SDXL 1.0 architecture, or
Flux.1-dev's transformer width with fewer blocks (benchmarks/flux.py), with random weights.

Each is written once as an ordinary diffusers folder (under $FINETUNE_CACHE/benchmarks, or
~/.cache/finetune/benchmarks) and then loaded exactly as a user's model would be.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image, ImageDraw

CONFIGS = Path(__file__).parent / "configs"
MODELS = ("tiny", "sd15", "sdxl", "flux")
# sdxl: the largest side at which floor and finetune, running side by side, fit a 24 GB CPU machine in bf16
# flux: 1024 image tokens beside T5's 512, a step of seconds on this machine
DEFAULT_RESOLUTION = {"tiny": 32, "sd15": 512, "sdxl": 512, "flux": 512}
# what the default recipe trains in, where fp32 would not fit the machines the figures come from
DEFAULT_MIXED_PRECISION = {"sdxl": "bf16", "flux": "bf16"}


def cache_root() -> Path:
    from finetune.paths import cache_home

    return cache_home() / "benchmarks"


def build_sd15(seed: int = 0):
    """A StableDiffusionPipeline with SD1.5's shapes and random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from finetune.models.tiny_clip import build_tokenizer

    def config(name: str) -> dict:
        return json.loads((CONFIGS / "sd15" / f"{name}.json").read_text())

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        **config("text_encoder"), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    return StableDiffusionPipeline(
        vae=AutoencoderKL(**config("vae")), text_encoder=text_encoder, tokenizer=tokenizer,
        unet=UNet2DConditionModel(**config("unet")), scheduler=DDIMScheduler(**config("scheduler")),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def build_sdxl(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A StableDiffusionXLPipeline with SDXL 1.0 base's shapes and random weights: CLIP ViT-L and OpenCLIP bigG
    (with its projection), a 2.567 B-parameter U-Net. `dtype`: of the U-Net and text encoders; the VAE stays fp32,
    as the released one runs (`force_upcast`)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from finetune.models.tiny_clip import build_tokenizer

    def config(name: str) -> dict:
        return json.loads((CONFIGS / "sdxl" / f"{name}.json").read_text())

    def clip(kind, name: str, tokenizer):
        return kind(CLIPTextConfig(**config(name), bos_token_id=tokenizer.bos_token_id,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))

    torch.manual_seed(seed)
    # the released second tokenizer pads with "!", the first with its end token
    tokenizer, tokenizer_2 = build_tokenizer(max_length=77), build_tokenizer(max_length=77, pad_token="!")
    vae = AutoencoderKL(**config("vae"))
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in `dtype` at once: no full-precision copy of 3.4 B weights on the way
    try:
        text_encoder = clip(CLIPTextModel, "text_encoder", tokenizer)
        text_encoder_2 = clip(CLIPTextModelWithProjection, "text_encoder_2", tokenizer_2)
        unet = UNet2DConditionModel(**config("unet"))
    finally:
        torch.set_default_dtype(default)
    with torch.device("cpu"):  # the schedule's tables, also when the networks are built on the meta device
        scheduler = EulerDiscreteScheduler(**config("scheduler"))
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)


def model_folder(model: str) -> Path:
    """The model's diffusers folder, built on first use."""
    folder = cache_root() / model
    if model == "flux":  # named by its blocks, so that changing benchmarks/flux.py's BLOCKS builds anew
        from benchmarks.flux import BLOCKS

        folder = cache_root() / f"flux-{BLOCKS['num_layers']}-{BLOCKS['num_single_layers']}"
    if (folder / "model_index.json").is_file():
        return folder
    if model == "tiny":
        from finetune.models.tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline()
    elif model == "sd15":
        print("building the SD1.5 architecture with random weights (once) ...", flush=True)
        pipe = build_sd15()
    elif model == "sdxl":
        # written in bf16 (14 GB in fp32): each benchmark process then loads it without a full-precision copy
        print("building the SDXL 1.0 architecture with random weights, bf16 (once, ~7 GB) ...", flush=True)
        pipe = build_sdxl(dtype=torch.bfloat16)
    elif model == "flux":
        from benchmarks.flux import BLOCKS, build_flux

        print(f"building Flux.1-dev's transformer with {BLOCKS} blocks, random weights, bf16 (once) ...", flush=True)
        pipe = build_flux(dtype=torch.bfloat16)
    else:
        raise SystemExit(f"--model: {model!r} is not one of {', '.join(MODELS)}")
    partial = folder.with_name(f".{folder.name}.partial")
    pipe.save_pretrained(partial, safe_serialization=True)
    partial.replace(folder)  # a present folder is always complete
    return folder


def data_folder(resolution: int, count: int = 4) -> Path:
    """`count` drawn images with captions at the resolution (one per step keeps every step the same size)."""
    folder = cache_root() / f"data-{resolution}-{count}"
    if folder.is_dir():
        return folder
    partial = folder.with_name(f".{folder.name}.partial")
    partial.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = Image.new("RGB", (resolution, resolution), "white")
        r = resolution // 4
        ImageDraw.Draw(image).ellipse((r - i, r, 3 * r + i, 3 * r), fill=(40 * i, 120, 200))
        image.save(partial / f"{i}.png")
        (partial / f"{i}.txt").write_text(f"a photo of a blue ball, number {i}")
    partial.replace(folder)
    return folder
