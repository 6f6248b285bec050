"""A LoRA file as what it means: per component, per adapted module, the factors `down`, `up` and `alpha`.

Every LoRA tool (convert, resize, merge, inspect, resuming from a file) works on this view, so each file
format needs only a reader and a writer. The diffusers/peft format lives here; kohya's in kohya_lora.py.
A layer's change to its module's weight is `up @ down * alpha / rank` (conv: `down` holds the kernel, `up` is 1x1).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from finetune.export import diffusers_lora


class LoraFileError(ValueError):
    """A LoRA file this toolkit cannot read or write as asked; the message says why and what to do."""


@dataclass
class LoraLayer:
    down: torch.Tensor  # [rank, in] or [rank, in, kh, kw]
    up: torch.Tensor  # [out, rank] or [out, rank, 1, 1]
    alpha: float
    magnitude: Optional[torch.Tensor] = None  # DoRA's per-output magnitude vector
    bias: Optional[torch.Tensor] = None  # peft's lora_bias (extract-lora writes it for changed biases)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> torch.Tensor:
        """The change this layer adds to its module's weight (without DoRA's renormalisation)."""
        up, down = self.up.float(), self.down.float()
        product = up.reshape(up.shape[0], -1) @ down.reshape(self.rank, -1)
        return (product * (self.alpha / self.rank)).reshape(up.shape[0], *down.shape[1:])


@dataclass
class LoraWeights:
    layers: dict[str, dict[str, LoraLayer]]  # component ("unet", "text_encoder") -> module path -> layer
    metadata: dict[str, str] = field(default_factory=dict)
    format: str = "diffusers"  # the file format it was read from: "diffusers" or "kohya"

    def modules(self) -> list[tuple[str, str, LoraLayer]]:
        return [(c, m, layer) for c, per in self.layers.items() for m, layer in sorted(per.items())]

    @property
    def uses_dora(self) -> bool:
        return any(layer.magnitude is not None for _, _, layer in self.modules())


def _matches(pattern: str, module: str) -> bool:
    # how peft reads rank_pattern / alpha_pattern keys: the pattern matches the module path's tail
    return re.match(rf"(.*\.)?({pattern})$", module) is not None


def per_module(config: dict, default_key: str, pattern_key: str, module: str, fallback: float) -> float:
    for pattern, value in (config.get(pattern_key) or {}).items():
        if _matches(pattern, module):
            return float(value)
    value = config.get(default_key)
    return float(value) if value is not None else fallback


def _adapter_configs(metadata: dict[str, str]) -> dict[str, dict]:
    """{"unet": {"r": 4, "lora_alpha": 4, ...}, ...} from diffusers' flattened `lora_adapter_metadata`."""
    raw = metadata.get(diffusers_lora.ADAPTER_METADATA_KEY)
    configs: dict[str, dict] = {}
    for key, value in (json.loads(raw) if raw else {}).items():
        component, _, name = key.partition(".")
        configs.setdefault(component, {})[name] = value
    return configs


# key tails of the two diffusers layouts: peft's (lora_A/lora_B) and the older one (lora.down/lora.up)
_DOWN, _UP = (".lora_A.weight", ".lora.down.weight"), (".lora_B.weight", ".lora.up.weight")


def from_diffusers(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str) -> LoraWeights:
    configs = _adapter_configs(metadata)
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


def peft_config(layers: dict[str, LoraLayer], use_dora: bool = False) -> dict:
    """A LoraConfig dict for one component that rebuilds exactly these layers (ranks and alphas per module)."""
    ranks = {m: layer.rank for m, layer in layers.items()}
    alphas = {m: layer.alpha for m, layer in layers.items()}
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    # full module paths as patterns: "to_q" alone would also match every other block's to_q
    return {"r": rank, "lora_alpha": alpha, "target_modules": sorted(layers),
            "rank_pattern": {m: r for m, r in ranks.items() if r != rank},
            "alpha_pattern": {m: a for m, a in alphas.items() if a != alpha},
            "use_dora": use_dora, "lora_bias": any(layer.bias is not None for layer in layers.values()),
            "lora_dropout": 0.0, "bias": "none", "init_lora_weights": True}


def peft_state_dict(layers: dict[str, LoraLayer]) -> dict[str, torch.Tensor]:
    """The keys `set_peft_model_state_dict` takes for one component."""
    out = {}
    for module, layer in layers.items():
        out[f"{module}.lora_A.weight"] = layer.down
        out[f"{module}.lora_B.weight"] = layer.up
        if layer.bias is not None:
            out[f"{module}.lora_B.bias"] = layer.bias
        if layer.magnitude is not None:
            out[f"{module}.lora_magnitude_vector"] = layer.magnitude
    return out


def write_diffusers(weights: LoraWeights, path: Path, metadata: dict[str, str] | None = None) -> Path:
    components = {c: peft_state_dict(layers) for c, layers in weights.layers.items()}
    configs = {c: peft_config(layers, weights.uses_dora) for c, layers in weights.layers.items()}
    # the old header's config would describe the old layers; everything else (training figures) carries over
    header = {k: v for k, v in (metadata if metadata is not None else weights.metadata).items()
              if k != diffusers_lora.ADAPTER_METADATA_KEY and k != "format"}
    return diffusers_lora.save_lora(Path(path), components, configs, header)


def _check_path(path: str | Path) -> None:
    if not str(path).endswith(".safetensors"):
        raise LoraFileError(f"{path}: expected a .safetensors LoRA file")
    if not Path(path).is_file():
        raise LoraFileError(f"{path}: no such file")


def tensor_names(path: str | Path) -> list[str]:
    _check_path(path)
    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


def read_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    _check_path(path)
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})


def is_kohya(keys: list[str]) -> bool:
    return any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys)


def read_lora(path: str | Path, module_names: dict[str, list[str]] | None = None) -> LoraWeights:
    """Any LoRA file this toolkit knows (diffusers/peft or kohya), as layers. `module_names` (component ->
    the model's module paths) resolves kohya's underscored names exactly; without it they are parsed."""
    from finetune.export import kohya_lora

    tensors, metadata = read_tensors(path)
    if not tensors:
        raise LoraFileError(f"{path}: holds no tensors")
    if is_kohya(list(tensors)):
        return kohya_lora.from_kohya(tensors, metadata, str(path), module_names)
    return from_diffusers(tensors, metadata, str(path))

