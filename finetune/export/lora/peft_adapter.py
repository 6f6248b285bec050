"""LoHa, LoKr and OFT files: the LoRA file's layout, for the variants diffusers has no loader for.

Keys are peft's, prefixed by component, as in diffusers' LoRA file (`unet.<module>.hada_w1_a`,
`text_encoder.<module>.lokr_w1`, `unet.<module>.oft_R.weight`). The header names the variant (`finetune.variant`)
and holds each component's peft config as JSON (`finetune.peft_config`), so the layers are rebuilt exactly.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from finetune.export.lora.diffusers import alpha_equal_to_rank, pack, unpack
from finetune.export.lora.layers import PEFT_CONFIG_KEY, VARIANT_KEY, AdapterFile, per_module, training_header
from finetune.io.safetensors_io import read_metadata, read_safetensors, save_safetensors
from finetune.networks import peft_layers

PEFT_ONLY_VARIANTS = ("loha", "lokr", "oft")


def config_json(configs: dict[str, dict]) -> str:
    """{"unet": LoHaConfig.to_dict(), ...} as JSON (sets as sorted lists, the peft type as its name)."""
    plain = {component: {key: sorted(value) if isinstance(value, set) else value for key, value in config.items()}
             for component, config in configs.items()}
    return json.dumps(plain, indent=2, sort_keys=True, default=str)


def save_peft_adapter(path: Path, components: dict[str, dict[str, torch.Tensor]], configs: dict[str, dict],
                      metadata: dict[str, str]) -> Path:
    """The file from peft's per-component state dicts and configs as dicts; `metadata` names the variant."""
    if metadata.get(VARIANT_KEY) not in PEFT_ONLY_VARIANTS:
        raise ValueError(f"{VARIANT_KEY} must be one of {PEFT_ONLY_VARIANTS}, got {metadata.get(VARIANT_KEY)!r}")
    if metadata[VARIANT_KEY] in FOLDED:
        components = {name: fold_strength(state, configs.get(name, {}), metadata[VARIANT_KEY])
                      for name, state in components.items()}
        configs = {name: alpha_equal_to_rank(config, "alpha") for name, config in configs.items()}
    header = {"format": "pt", PEFT_CONFIG_KEY: config_json(configs), **metadata}
    return save_safetensors(pack(components), path, header)


# LoHa's and LoKr's first factor, which peft's strength alpha / r multiplies (its delta is linear in it)
FOLDED = {"loha": ("hada_w1_a",), "lokr": ("lokr_w1", "lokr_w1_a")}


def fold_strength(state: dict[str, torch.Tensor], config: dict, variant: str) -> dict[str, torch.Tensor]:
    """A LoHa/LoKr state dict with each module's alpha / r multiplied into its first factor, for alpha written
    equal to r: ComfyUI and Forge apply `transformer.` LoHa/LoKr keys of this layout (Flux, SD3) at alpha / r only
    with a `.alpha` tensor (comfy/weight_adapter/loha.py, lokr.py), at 1 without, and the header is peft's alone."""
    out = dict(state)
    for key, value in state.items():
        module, _, role = key.rpartition(".")
        if role not in FOLDED[variant]:
            continue
        rank = per_module(config, "r", "rank_pattern", module, float(config.get("r", 1)))
        scale = per_module(config, "alpha", "alpha_pattern", module, rank) / rank
        if scale != 1.0:
            out[key] = (value.float() * scale).to(value.dtype)
    return out


def is_peft_adapter(metadata: dict[str, str], keys: list[str]) -> bool:
    """Whether the header names a LoHa, LoKr or OFT adapter in this layout."""
    return metadata.get(VARIANT_KEY) in PEFT_ONLY_VARIANTS


def read_peft_adapter_file(path: str | os.PathLike, module_names: dict[str, list[str]] | None = None
                           ) -> AdapterFile:
    """The file as peft's layers (its module paths are the model's own, so `module_names` is not needed)."""
    tensors, metadata = read_safetensors(path)
    configs = configs_from_metadata(metadata, str(path))
    return AdapterFile(metadata[VARIANT_KEY], unpack(tensors), {c: config.to_dict() for c, config in configs.items()},
                       training_header(metadata))


def write_peft_adapter_file(adapter: AdapterFile, path: str | os.PathLike) -> Path:
    """`adapter` in this layout, its variant and peft configs in the header."""
    return save_peft_adapter(Path(path), adapter.states, adapter.configs,
                             {**adapter.metadata, VARIANT_KEY: adapter.variant})


def configs_from_metadata(metadata: dict[str, str], source: str) -> dict[str, Any]:
    """Each component's peft config, from the header's JSON."""
    from peft import PeftConfig

    try:
        plain = json.loads(metadata[PEFT_CONFIG_KEY])
        return {component: PeftConfig.from_peft_type(**config) for component, config in plain.items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{source}: a {metadata.get(VARIANT_KEY)} adapter whose {PEFT_CONFIG_KEY} header is "
                         f"missing or unreadable ({type(exc).__name__}: {exc})") from None


def load_peft_adapter(pipe: Any, path: str, scale: float, name: str) -> str:
    """Rebuild the file's adapter layers in `pipe` under `name`, active alone, at strength `scale`."""
    from finetune.io.safetensors_io import load_tensors

    metadata = read_metadata(path)
    variant = metadata[VARIANT_KEY]
    if variant == "oft" and scale != 1:
        raise ValueError(f"{path}: an OFT adapter has no strength to scale (it rotates each layer's input by a "
                         f"learned orthogonal matrix); load it with scale 1, not {scale}")
    return load_components(pipe, configs_from_metadata(metadata, path), unpack(load_tensors(path)),
                           name, None if variant == "oft" else scale, path)


def load_components(pipe: Any, configs: dict[str, Any], components: dict[str, dict[str, torch.Tensor]], name: str,
                    scale: float | None, source: str) -> str:
    """Put adapter `name` into each of the pipeline's `components` ({"unet": peft state dict, ...}) with its peft
    config, through peft (networks/peft_layers.py); all or nothing. `scale`: the strength (None: leave it)."""
    for component in components:
        module = getattr(pipe, component, None)
        if module is None or component not in configs:
            raise ValueError(f"{source}: holds {component} weights, but "
                             + ("this pipeline has no " + component if module is None else "no config for them"))
        if name in peft_layers.adapter_names(module):
            raise ValueError(f"an adapter named {name!r} is already loaded in {component}; pass another name or "
                             "unload it first")
    try:
        for component, state in components.items():
            _inject(getattr(pipe, component), configs[component], state, name, f"{source} ({component})")
    except BaseException:
        _remove(pipe, components, name)  # nothing half-loaded stays behind
        raise
    if scale is not None:
        _set_scale(pipe, components, name, scale)
    return name


def _inject(module: Any, config: Any, state: dict[str, torch.Tensor], name: str, source: str) -> None:
    # peft_layers keeps diffusers' bookkeeping, so pipe.get_list_adapters / delete_adapters (and unload_adapter) see
    # it like a LoRA; the adapter is active alone
    peft_layers.inject(module, config, name)
    # a size mismatch (an adapter for another base) is explained by finetune.load_adapter, for every format
    result = peft_layers.load_state_dict(module, state, name)
    # load_state_dict(strict=False) lists every base weight as missing: only the adapter's own count (peft names
    # them with the adapter's name as one part, e.g. `to_q.hada_w1_a.<name>`, `to_q.oft_R.<name>.weight`)
    missing = [k for k in result.missing_keys if name in k.split(".")]
    if missing or result.unexpected_keys:
        raise ValueError(f"{source}: the file does not match the layers its config builds in this model "
                         f"(missing: {missing[:3]}, unexpected: {list(result.unexpected_keys)[:3]}); was it trained "
                         "on another base model?")


def _set_scale(pipe: Any, components: dict, name: str, scale: float) -> None:
    for component in components:
        peft_layers.set_scale(getattr(pipe, component), name, scale)


def _remove(pipe: Any, components: dict, name: str) -> None:
    for component in components:
        module = getattr(pipe, component)
        if name in peft_layers.adapter_names(module):  # a failed load may have stopped before this component
            peft_layers.remove(module, name)
