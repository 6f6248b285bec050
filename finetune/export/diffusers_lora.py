"""The LoRA file `StableDiffusionPipeline.load_lora_weights` reads: peft keys prefixed by component.

Keys look like `unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight`; the header's
`lora_adapter_metadata` holds each component's LoraConfig (rank, alpha, targets, DoRA) as diffusers expects,
since without it diffusers would take alpha equal to rank.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from finetune.export.safetensors_io import save_safetensors

FILE_NAME = "pytorch_lora_weights.safetensors"
ADAPTER_METADATA_KEY = "lora_adapter_metadata"


def pack(components: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{"unet": sd, "text_encoder": sd} -> one flat dict with component prefixes."""
    return {f"{prefix}.{key}": value for prefix, state in components.items() for key, value in state.items()}


def unpack(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        prefix, _, rest = key.partition(".")
        out.setdefault(prefix, {})[rest] = value
    return out


def adapter_metadata(configs: dict[str, dict]) -> str:
    """Flatten {"unet": LoraConfig.to_dict(), ...} the way diffusers writes it: "unet.r", "unet.lora_alpha", ..."""
    flat = {}
    for prefix, config in configs.items():
        for key, value in config.items():
            flat[f"{prefix}.{key}"] = sorted(value) if isinstance(value, set) else value
    return json.dumps(flat, indent=2, sort_keys=True, default=str)


def save_lora(path: Path, components: dict[str, dict[str, torch.Tensor]], configs: dict[str, dict],
              metadata: dict[str, str]) -> Path:
    header = {"format": "pt", ADAPTER_METADATA_KEY: adapter_metadata(configs), **metadata}
    return save_safetensors(pack(components), path, header)
