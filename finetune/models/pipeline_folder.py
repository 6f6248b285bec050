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
            blocks = json.load(handle).get("block_out_channels")
    except (OSError, ValueError):
        return None
    return 2 ** (len(blocks) - 1) if isinstance(blocks, list) and blocks else None
