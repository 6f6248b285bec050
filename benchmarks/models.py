"""Model and data the benchmarks run on: the tiny test pipeline, or the SD1.5 architecture with random weights.

Both are written once as ordinary diffusers folders (under $FINETUNE_CACHE/benchmarks, or
~/.cache/finetune/benchmarks) and then loaded exactly as a user's model would be.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image, ImageDraw

CONFIGS = Path(__file__).parent / "configs"
MODELS = ("tiny", "sd15")
DEFAULT_RESOLUTION = {"tiny": 32, "sd15": 512}


def cache_root() -> Path:
    from finetune.paths import cache_home

    return cache_home() / "benchmarks"


def build_sd15(seed: int = 0):
    """A StableDiffusionPipeline with SD1.5's shapes and random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from finetune.models.tiny import build_tokenizer

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


def model_folder(model: str) -> Path:
    """The model's diffusers folder, built on first use."""
    folder = cache_root() / model
    if (folder / "model_index.json").is_file():
        return folder
    if model == "tiny":
        from finetune.models.tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline()
    elif model == "sd15":
        print("building the SD1.5 architecture with random weights (once) ...", flush=True)
        pipe = build_sd15()
    else:
        raise SystemExit(f"--model: {model!r} is not one of {', '.join(MODELS)}")
    partial = folder.with_name(f".{model}.partial")
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
