"""The LoRA file `StableDiffusionPipeline.load_lora_weights` reads: peft keys prefixed by component.

Keys look like `unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight`; the header's
`lora_adapter_metadata` holds each component's LoraConfig (rank, alpha, targets, DoRA) as diffusers expects,
since without it diffusers would take alpha equal to rank. Files of the older layout (`lora.down` / `lora.up`)
are read too.

Written files carry every module's alpha / rank folded into its `lora_B` (and `lora_B.bias`), with alpha written
equal to the rank: other programs read this layout without the header. ComfyUI (comfy/lora.py `load_lora`,
comfy/weight_adapter/lora.py `LoRAAdapter.calculate_weight`) and Forge (packages_3rdparty/comfyui_lora_collection/
lora.py `load_lora`) scale a module by `<key>.alpha` / rank when that tensor exists and by 1 otherwise, and
diffusers' SD3 loader (`SD3LoraLoaderMixin.load_lora_weights`) refuses any key without "lora" in it, so `.alpha`
tensors are no option: folded, the file is applied at its trained strength by every one of them.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from finetune.export.lora.layers import LoraFileError, LoraLayer, LoraWeights, peft_config, peft_state_dict, per_module
from finetune.io.safetensors_io import save_safetensors

FILE_NAME = "pytorch_lora_weights.safetensors"
ADAPTER_METADATA_KEY = "lora_adapter_metadata"


def pack(components: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{"unet": sd, "text_encoder": sd} -> one flat dict with component prefixes."""
    return {f"{prefix}.{key}": value for prefix, state in components.items() for key, value in state.items()}


def unpack(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """One flat dict with component prefixes -> {"unet": sd, ...} (the inverse of `pack`)."""
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


def adapter_configs(metadata: dict[str, str]) -> dict[str, dict]:
    """{"unet": {"r": 4, "lora_alpha": 4, ...}, ...} from diffusers' flattened `lora_adapter_metadata`."""
    raw = metadata.get(ADAPTER_METADATA_KEY)
    configs: dict[str, dict] = {}
    for key, value in (json.loads(raw) if raw else {}).items():
        component, _, name = key.partition(".")
        configs.setdefault(component, {})[name] = value
    return configs


def save_lora(path: Path, components: dict[str, dict[str, torch.Tensor]], configs: dict[str, dict],
              metadata: dict[str, str]) -> Path:
    """The file from peft's per-component state dicts and their configs as dicts, atomically. Text-encoder keys
    keep CLIP's `text_model.` level, which transformers >= 5.6 dropped from CLIPTextModel: ComfyUI's key map and
    the files other tools share expect it, and diffusers' loader reads both."""
    # the configs' module paths lose the level instead: peft matches them as path tails, so they fit a CLIP with
    # or without it, while a path with it fails on one without
    configs = {name: _without_text_model(config) if name.startswith("text_encoder") else config
               for name, config in configs.items()}
    folded = {name: fold_alpha(state, configs.get(name, {})) for name, state in components.items()}
    configs = {name: alpha_equal_to_rank(config) for name, config in configs.items()}
    header = {"format": "pt", ADAPTER_METADATA_KEY: adapter_metadata(configs), **metadata}
    with_level = {name: {with_text_model(name, key): value for key, value in state.items()}
                  for name, state in folded.items()}
    return save_safetensors(pack(with_level), path, header)


def fold_alpha(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A component's peft state dict with each module's alpha / rank (from `config`, peft's LoraConfig as a dict;
    the rank from `lora_A`'s rows) multiplied into its `lora_B.weight` and `lora_B.bias`: the same change,
    `B @ A * alpha / rank`, at a scale of 1. Modules already at scale 1 keep their tensors bit for bit."""
    out = dict(state)
    for key, down in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        rank = down.shape[0]
        scale = per_module(config, "lora_alpha", "alpha_pattern", module, float(rank)) / rank
        if scale == 1.0:
            continue
        for tail in (".lora_B.weight", ".lora_B.bias"):
            if module + tail in state:
                value = state[module + tail]
                out[module + tail] = (value.float() * scale).to(value.dtype)
    return out


def alpha_equal_to_rank(config: dict, alpha_key: str = "lora_alpha") -> dict:
    """A peft config dict whose alpha (`alpha_key`: LoraConfig's lora_alpha, LoHa's and LoKr's alpha) is each
    module's rank (scale 1), for weights whose alpha / rank is folded in."""
    config = dict(config)
    if "r" in config:
        config[alpha_key] = config["r"]
        config["alpha_pattern"] = dict(config.get("rank_pattern") or {})
    return config


def _without_text_model(config: dict) -> dict:
    def short(name: str) -> str:
        return name.removeprefix("text_model.")
    config = dict(config)
    if isinstance(config.get("target_modules"), (list, tuple, set)):
        config["target_modules"] = sorted({short(m) for m in config["target_modules"]})
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            config[key] = {short(m): v for m, v in config[key].items()}
    return config


def with_text_model(component: str, module: str) -> str:
    """A text encoder's module path (or key) with CLIP's `text_model.` level, whichever transformers made it."""
    if component.startswith("text_encoder") and not module.startswith("text_model."):
        return f"text_model.{module}"
    return module


# key tails of the two diffusers layouts: peft's (lora_A/lora_B) and the older one (lora.down/lora.up)
_DOWN, _UP = (".lora_A.weight", ".lora.down.weight"), (".lora_B.weight", ".lora.up.weight")


def from_diffusers(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str) -> LoraWeights:
    """The file's tensors and header as layers (alpha from the header's configs; the rank where it says none)."""
    configs = adapter_configs(metadata)
    parts: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for key, value in tensors.items():
        component, _, rest = key.partition(".")
        for role, tails in (("down", _DOWN), ("up", _UP), ("bias", (".lora_B.bias",)),
                            ("magnitude", (".lora_magnitude_vector", ".lora_magnitude_vector.weight"))):
            tail = next((t for t in tails if rest.endswith(t)), None)
            if tail:
                parts.setdefault(component, {}).setdefault(rest[: -len(tail)], {})[role] = value
                break
        else:
            raise LoraFileError(f"{source}: key {key!r} is not a LoRA weight (expected ...lora_A.weight / "
                                "lora_B.weight); LoHa, LoKr and OFT files cannot be converted or resized yet")
    layers: dict[str, dict[str, LoraLayer]] = {}
    for component, modules in parts.items():
        config = configs.get(component, {})
        for module, found in modules.items():
            if "down" not in found or "up" not in found:
                raise LoraFileError(f"{source}: {component}.{module} has only one of its two LoRA factors")
            rank = found["down"].shape[0]
            # diffusers takes alpha equal to the rank when the file does not say (scale 1)
            alpha = per_module(config, "lora_alpha", "alpha_pattern", module, float(rank))
            layers.setdefault(component, {})[module] = LoraLayer(found["down"], found["up"], alpha,
                                                                 found.get("magnitude"), found.get("bias"))
    return LoraWeights(layers, dict(metadata))


def write_diffusers(weights: LoraWeights, path: Path, metadata: dict[str, str] | None = None) -> Path:
    """The diffusers file of these layers; the header keeps `metadata` (default: the layers' own)."""
    components = {c: peft_state_dict(layers) for c, layers in weights.layers.items()}
    configs = {c: peft_config(layers, weights.uses_dora) for c, layers in weights.layers.items()}
    # the old header's config would describe the old layers; everything else (training figures) carries over
    header = {k: v for k, v in (metadata if metadata is not None else weights.metadata).items()
              if k != ADAPTER_METADATA_KEY and k != "format"}
    return save_lora(Path(path), components, configs, header)
