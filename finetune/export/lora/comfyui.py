"""The LoRA layout ComfyUI reads for a transformer family: `diffusion_model.` + the model's original module path +
`.lora_A.weight` / `.lora_B.weight`, the modules the original model fuses fused (ai-toolkit, SimpleTuner and
OneTrainer's COMFY export write this layout; ComfyUI's comfy/lora.py maps `diffusion_model.<original>` keys to
its own model's weights, and diffusers' loaders convert them back for Flux.2, Qwen-Image and others).

Which original name a diffusers module has is the family's knowledge, declared in its spec
(`FamilySpec.comfyui_names`, an `OriginalNames`: finetune/models/family.py); this module only applies it.
Alpha is folded into `lora_B` (no `.alpha` tensors: ComfyUI scales a module by alpha / rank only when one
exists), as in finetune's diffusers-layout file, so every reader applies the file at its trained strength.
Fusing and splitting are kohya_flux.py's exact block-diagonal ones.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from finetune.export.lora.kohya_flux import fuse, split
from finetune.export.lora.layers import LoraFileError, LoraLayer, LoraWeights
from finetune.io.safetensors_io import save_safetensors

DENOISER = "transformer"
COMFYUI_DIR = "comfyui"  # a run's ComfyUI-layout file: output_dir/comfyui/<output_dir name>.safetensors
_DOWN, _UP = ".lora_A.weight", ".lora_B.weight"


def is_comfyui(keys: list[str]) -> bool:
    """Keys of this layout: every LoRA factor under `diffusion_model.`."""
    factors = [k for k in keys if k.endswith((_DOWN, _UP))]
    return bool(factors) and all(k.startswith("diffusion_model.") for k in factors)


def _block(names: Any, module: str) -> tuple[str, str, str] | None:
    """(diffusers block list, index, the module's path inside the block) for a module in a renamed block list."""
    for listed in names.blocks:
        found = re.fullmatch(rf"{re.escape(listed)}\.(\d+)\.(.+)", module)
        if found:
            return listed, found.group(1), found.group(2)
    return None


def to_original(layers: dict[str, LoraLayer], names: Any) -> dict[str, LoraLayer]:
    """The denoiser's layers (diffusers module path -> layer) under the original names, fused where the original
    fuses (a member not trained gets zero rows: `names.widths` gives its width relative to the fused module's
    input where it is not that input's). LoraFileError names a module the original layout has no place for."""
    out: dict[str, LoraLayer] = {}
    groups: dict[tuple[str, str, str], dict[str, LoraLayer]] = {}
    for module, layer in layers.items():
        if module in names.top:
            out[names.top[module]] = layer
            continue
        found = _block(names, module)
        if found is None and not names.blocks:  # the original names are diffusers' own (Qwen-Image)
            out[module] = layer
            continue
        if found is not None:
            listed, index, rest = found
            prefix = f"{names.blocks[listed]}.{index}"
            renamed = names.renamed.get(listed, {})
            if rest in renamed:
                out[f"{prefix}.{renamed[rest]}"] = layer
                continue
            fused = next((name for name, members in names.fused.get(listed, {}).items() if rest in members), None)
            if fused is not None:
                groups.setdefault((listed, prefix, fused), {})[rest] = layer
                continue
        raise LoraFileError(f"transformer.{module} has no place in ComfyUI's layout for this family (the original "
                            "model's module names); keep this LoRA in the diffusers format, which ComfyUI also reads")
    for (listed, prefix, fused), present in groups.items():
        members = names.fused[listed][fused]
        inner = next(iter(present.values())).down.shape[1]
        widths = [present[m].up.shape[0] if m in present else int(names.widths.get(m, 1) * inner) for m in members]
        out[f"{prefix}.{fused}"] = fuse([(present.get(m), width) for m, width in zip(members, widths)])
    return out


def from_original(layers: dict[str, LoraLayer], names: Any, source: str) -> dict[str, LoraLayer]:
    """Original module path -> layer back to diffusers module paths, fused modules split (members never trained
    left out). LoraFileError names a module the family's names do not place."""
    inverse_top = {original: module for module, original in names.top.items()}
    inverse_blocks = {original: listed for listed, original in names.blocks.items()}
    out: dict[str, LoraLayer] = {}
    for path, layer in layers.items():
        if path in inverse_top:
            out[inverse_top[path]] = layer
            continue
        found = next(((listed, m.group(1), m.group(2)) for original, listed in inverse_blocks.items()
                      for m in [re.fullmatch(rf"{re.escape(original)}\.(\d+)\.(.+)", path)] if m), None)
        if found is None and not names.blocks:
            out[path] = layer
            continue
        if found is not None:
            listed, index, rest = found
            block = f"{listed}.{index}."
            inverse = {original: module for module, original in names.renamed.get(listed, {}).items()}
            members = names.fused.get(listed, {}).get(rest)
            if rest in inverse:
                out[block + inverse[rest]] = layer
                continue
            if members is not None:
                inner = layer.down.shape[1]
                ratios = [names.widths.get(m, 1) for m in members]
                widths = [int(r * inner) for r in ratios]
                if sum(widths) != layer.up.shape[0]:  # the input is not the unit (a wider fused input)
                    unit = layer.up.shape[0] / sum(ratios)
                    widths = [int(r * unit) for r in ratios]
                for name, part in split(layer, widths, members).items():
                    out[block + name] = part
                continue
        raise LoraFileError(f"{source}: diffusion_model.{path} is no module of this family's ComfyUI layout")
    return out


def write_comfyui(weights: LoraWeights, path: str | Path, names: Any, metadata: dict[str, str] | None = None
                  ) -> Path:
    """The ComfyUI-layout file of a LoRA's denoiser layers (text-encoder layers are not in this layout: they stay
    in the diffusers file), alpha folded into lora_B; the header keeps `metadata` (default: the layers' own)."""
    if DENOISER not in weights.layers:
        raise LoraFileError("ComfyUI's diffusion_model. layout holds a transformer's layers, and this LoRA has none")
    tensors: dict[str, torch.Tensor] = {}
    for original, layer in sorted(to_original(weights.layers[DENOISER], names).items()):
        tensors[f"{names.prefix}{original}{_DOWN}"] = layer.down.contiguous()
        tensors[f"{names.prefix}{original}{_UP}"] = (layer.up * (layer.alpha / layer.rank)).to(layer.up.dtype)
    header = {k: v for k, v in (metadata if metadata is not None else weights.metadata).items()
              if k not in ("lora_adapter_metadata", "format")}
    return save_safetensors(tensors, Path(path), header)


def from_comfyui(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str, names: Any
                 ) -> LoraWeights:
    """A ComfyUI-layout file's tensors as diffusers-named transformer layers (alpha: the rank, as written, unless
    an `.alpha` tensor says otherwise, as other trainers write)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        rest = key.removeprefix(names.prefix)
        for role, tails in (("down", (_DOWN, ".lora_down.weight")), ("up", (_UP, ".lora_up.weight")),
                            ("alpha", (".alpha",))):
            tail = next((t for t in tails if rest.endswith(t)), None)
            if tail:
                parts.setdefault(rest[: -len(tail)], {})[role] = value
                break
        else:
            raise LoraFileError(f"{source}: key {key!r} is not a LoRA factor of ComfyUI's layout")
    layers = {}
    for path, found in parts.items():
        if "down" not in found or "up" not in found:
            raise LoraFileError(f"{source}: {names.prefix}{path} has only one of its two LoRA factors")
        rank = found["down"].shape[0]
        alpha = float(found["alpha"]) if "alpha" in found else float(rank)
        layers[path] = LoraLayer(found["down"], found["up"], alpha)
    return LoraWeights({DENOISER: from_original(layers, names, source)}, dict(metadata), format="comfyui")


def names_for(metadata: dict[str, str], source: str) -> Any | None:
    """The OriginalNames of the family a file's header names (finetune's recipe, kohya's ss_base_model_version),
    or None when it names none with a ComfyUI layout."""
    from finetune.export.lora.kohya_names import family_in_header

    told = family_in_header(metadata)
    return told.comfyui_names if told is not None else None


def read_comfyui(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str,
                 module_names: dict[str, list[str]] | None = None) -> LoraWeights:
    """The file as diffusers-named layers: with the names of the family its header names, or else of the one
    family whose names put every layer on a module of the model (`module_names`: component -> module paths).
    LoraFileError when neither tells."""
    from finetune.models import specs

    names = names_for(metadata, source)
    if names is not None:
        return from_comfyui(tensors, metadata, source, names)
    present = set((module_names or {}).get(DENOISER, ()))
    for spec in specs().values() if present else ():
        if spec.comfyui_names is None:
            continue
        try:
            weights = from_comfyui(tensors, metadata, source, spec.comfyui_names)
        except LoraFileError:
            continue
        if set(weights.layers[DENOISER]) <= present:
            return weights
    raise LoraFileError(f"{source}: a ComfyUI-layout LoRA whose header names no family trained here, and no base "
                        "whose modules it fits; give the base model (--base) it was trained on")


def write_comfyui_file(weights: LoraWeights, path: str | Path) -> Path:
    """`finetune convert --to comfyui`: the names of the family the layers' header names."""
    names = names_for(weights.metadata, str(path))
    if names is None:
        raise LoraFileError(f"{path}: the LoRA's header names no family with a ComfyUI layout here (the README's "
                            "family table lists them, column LoRA files); the diffusers file is what ComfyUI reads "
                            "for the others")
    return write_comfyui(weights, path, names)
