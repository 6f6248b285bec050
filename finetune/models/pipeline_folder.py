"""What a diffusers pipeline folder says about its model without loading it (plain JSON, no torch): for checks
that run before any model loads."""
from __future__ import annotations

import json
import os


def vae_downsampling(base: str | None) -> int | None:
    """How many pixels of the image one latent covers along a side: 2 ** (number of VAE blocks - 1), read from
    `<base>/vae/config.json` (AutoencoderKL's `block_out_channels`); 8 for Stable Diffusion, SDXL, SD3 and Flux.
    None when `base` is not a local pipeline folder (a hub id or a single file: not known before loading)."""
    if not base:
        return None
    config = os.path.join(os.path.expanduser(base), "vae", "config.json")
    try:
        with open(config, encoding="utf-8") as handle:
            return downsampling_of(json.load(handle))
    except (OSError, ValueError):
        return None


def latent_channels_of(config) -> int | None:
    """A VAE config's latent channels: AutoencoderKL's `latent_channels`, the Wan-type causal VAE's `z_dim`."""
    return config.get("latent_channels") or config.get("z_dim")


def downsampling_of(config) -> int | None:
    """A VAE config's pixels per latent along a side: AutoencoderKL's 2 ** (len(block_out_channels) - 1), the
    Wan-type causal VAE's (Qwen-Image's) 2 ** len(temperal_downsample), as its pipelines compute it."""
    blocks, stages = config.get("block_out_channels"), config.get("temperal_downsample")
    if isinstance(blocks, (list, tuple)) and blocks:
        return 2 ** (len(blocks) - 1)
    return 2 ** len(stages) if isinstance(stages, (list, tuple)) else None


def parts_stored_as_none(base: str | None) -> dict[str, None]:
    """The parts a local pipeline folder's model_index.json lists as `[null, null]` (saved without them, e.g. an
    SD3 folder without T5), as `{name: None}` keyword arguments: diffusers' from_pretrained refuses such a folder
    unless each is passed as None. Empty for a hub id, a single file or a folder without model_index.json."""
    if not base:
        return {}
    try:
        with open(os.path.join(os.path.expanduser(base), "model_index.json"), encoding="utf-8") as handle:
            index = json.load(handle)
    except (OSError, ValueError):
        return {}
    return {name: None for name, value in index.items()
            if not name.startswith("_") and isinstance(value, list) and value == [None, None]}
