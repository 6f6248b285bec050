"""LoHa and LoKr in the LyCORIS layout that AUTOMATIC1111, Forge and ComfyUI read (`strategy.formats: [kohya]`,
`finetune convert --to kohya`), and back.

Keys are kohya's module names with LyCORIS's tensor names: `lora_unet_<module>.hada_w1_a`, `.hada_w1_b`,
`.hada_w2_a`, `.hada_w2_b` (LoHa), `.lokr_w1`, `.lokr_w2` or `.lokr_w2_a` + `.lokr_w2_b` (LoKr), and a 0-d
`.alpha`. peft's tensors have LyCORIS's orientation, so they are copied as they are. The readers' strength
(AUTOMATIC1111 extensions-builtin/Lora network_hada.py / network_lokr.py with NetworkModule.calc_scale; ComfyUI
comfy/weight_adapter/loha.py, lokr.py) is alpha / r, r being `hada_w1_b`'s or the `_b` factor's rows, peft's
alpha / r as well; but a LoKr module whose factors are both whole matrices (no `_b`) gets strength 1 there,
whatever alpha says, so its alpha / r goes into `lokr_w2` and alpha is written equal to r.
Refused, since those readers cannot apply them alike: Tucker factors (`hada_t1`, `lokr_t2`; ComfyUI fails on
`lokr_t2`, upstream issue Comfy-Org/ComfyUI#11245) and a factorised `lokr_w1` (peft's decompose_both).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from finetune.export.family_header import family_fields, version_from_width
from finetune.export.lora.kohya import kohya_module, name_resolver, split_name
from finetune.export.lora.kohya_names import SD_NAMING, KohyaNaming
from finetune.export.lora.layers import AdapterFile, LoraFileError, per_module, training_header
from finetune.io.safetensors_io import read_safetensors, save_safetensors

ROLES = {"loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
         "lokr": ("lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b")}
UNSUPPORTED = ("hada_t1", "hada_t2", "lokr_t2", "lokr_w1_a", "lokr_w1_b")


def is_lycoris(keys: list[str]) -> bool:
    """Whether the keys are LyCORIS's LoHa / LoKr tensors under kohya names."""
    return any(k.startswith("lora_") and (".hada_" in k or ".lokr_" in k) for k in keys)


def _by_module(state: dict[str, torch.Tensor], source: str) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        module, _, role = key.rpartition(".")
        if role in UNSUPPORTED:
            raise LoraFileError(f"{source}: {key} is a {role} factor, which AUTOMATIC1111 and ComfyUI do not apply "
                                "alike; train without use_effective_conv2d / decompose_both to export it")
        modules.setdefault(module, {})[role] = value
    return modules


def to_lycoris(variant: str, components: dict[str, dict[str, torch.Tensor]],
               configs: dict[str, dict], naming: KohyaNaming = SD_NAMING) -> dict[str, torch.Tensor]:
    """LyCORIS tensors from peft's per-component state dicts ({"unet": {"<module>.hada_w1_a": ...}}) and their
    peft configs as dicts (r, alpha, rank_pattern, alpha_pattern)."""
    if variant not in ROLES:
        raise LoraFileError(f"the LyCORIS layout here holds loha and lokr, not {variant}")
    tensors: dict[str, torch.Tensor] = {}
    for component, state in components.items():
        config = configs[component]
        for module, found in _by_module(state, f"{component} adapter").items():
            rank = per_module(config, "r", "rank_pattern", module, float(config["r"]))
            alpha = per_module(config, "alpha", "alpha_pattern", module, rank)
            if variant == "lokr" and "lokr_w2_b" not in found:
                # both factors whole: the readers apply strength 1, so peft's alpha / r moves into the weights
                found = {**found, "lokr_w2": found["lokr_w2"] * (alpha / rank)}
                alpha = rank
            stem = kohya_module(component, module, naming)
            for role, value in found.items():
                tensors[f"{stem}.{role}"] = value.detach().contiguous()
            tensors[f"{stem}.alpha"] = torch.tensor(float(alpha))
    return tensors


def lycoris_metadata(variant: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                     version: str | None = None) -> dict[str, str]:
    """kohya's header keys UIs show for a LyCORIS network, beside the training metadata, and the ones they tell
    the family by (family_header.py): `version` (kohya's ss_base_model_version; None: the header's, else told
    from the cross-attention width). Without them AUTOMATIC1111 takes an SDXL file for an SD1 one."""
    alphas = [float(v) for k, v in tensors.items() if k.endswith(".alpha")]
    ranks = [v.shape[0] for k, v in tensors.items() if k.endswith((".hada_w1_b", ".lokr_w2_b"))]
    version = version or metadata.get("ss_base_model_version") or version_from_width(_context_width(tensors), None)
    return {**metadata, **family_fields(version, "lora", metadata.get("finetune.base_model", "")),
            "ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": variant}),
            "ss_network_dim": str(max(ranks, default=0)), "ss_network_alpha": str(max(alphas, default=0.0))}


def _context_width(tensors: dict[str, torch.Tensor]) -> int | None:
    """The input width of a cross-attention key projection (the text encoder's output width), from its LoHa or
    LoKr factors; None when no such module is adapted."""
    for key, value in tensors.items():
        if "_attn2_to_k." not in key:
            continue
        if key.endswith(".hada_w1_b"):
            return int(value.shape[1])
        if key.endswith(".lokr_w1"):
            stem = key.rsplit(".", 1)[0]
            second = tensors.get(f"{stem}.lokr_w2", tensors.get(f"{stem}.lokr_w2_b"))
            return int(value.shape[1] * second.shape[1]) if second is not None else None
    return None


def from_lycoris(tensors: dict[str, torch.Tensor], source: str,
                 module_names: dict[str, list[str]] | None = None) -> tuple[str, dict, dict[str, Any]]:
    """(variant, peft state dicts per component, peft configs per component) that rebuild the file's layers
    with the strength its readers give them."""
    from peft import LoHaConfig, LoKrConfig

    variant = "loha" if any(".hada_" in k for k in tensors) else "lokr"
    grouped: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for key, value in tensors.items():
        stem, _, role = key.partition(".")
        named = split_name(stem)
        if named is None:
            raise LoraFileError(f"{source}: key {key!r} has no kohya prefix (lora_unet_, lora_te_, ...)")
        component, underscored = named
        grouped.setdefault(component, {}).setdefault(underscored, {})[role] = value
    states: dict[str, dict[str, torch.Tensor]] = {}
    configs: dict[str, Any] = {}
    for component, modules in grouped.items():
        resolve = name_resolver(component, None if module_names is None else module_names.get(component, []))
        ranks, alphas = {}, {}
        for underscored, found in modules.items():
            module = resolve(underscored)
            alpha = found.pop("alpha", None)
            strange = [role for role in found if role not in ROLES[variant]]
            if strange:
                raise LoraFileError(f"{source}: {component}.{module} holds {', '.join(strange)}, which this "
                                    f"toolkit does not read in a {variant} file (Tucker or decompose_both factors)")
            for role, value in found.items():
                states.setdefault(component, {})[f"{module}.{role}"] = value
            ranks[module], alphas[module] = _rank_and_alpha(variant, found, alpha)
        rank = max(set(ranks.values()), key=list(ranks.values()).count)
        alpha = max(set(alphas.values()), key=list(alphas.values()).count)
        config_class = LoHaConfig if variant == "loha" else LoKrConfig
        configs[component] = config_class(
            r=rank, alpha=alpha, target_modules=sorted(ranks),
            rank_pattern={m: r for m, r in ranks.items() if r != rank},
            alpha_pattern={m: a for m, a in alphas.items() if a != alpha})
    return variant, states, configs


def _rank_and_alpha(variant: str, found: dict[str, torch.Tensor], alpha: torch.Tensor | None) -> tuple[int, float]:
    """The peft rank and alpha that rebuild one module and give it the readers' strength."""
    if variant == "loha":
        rank = found["hada_w1_b"].shape[0]
    elif "lokr_w2_b" in found:
        rank = found["lokr_w2_b"].shape[0]
    else:
        # both factors whole: a rank of at least half lokr_w2's larger side makes peft build it whole (the alpha
        # we write, rank, when it is one), and strength 1 is what the readers apply
        larger = max(found["lokr_w2"].shape[:2])
        written = int(alpha) if alpha is not None and float(alpha).is_integer() else 0
        rank = written if 2 * written >= larger else larger
        return rank, float(rank)
    return rank, float(alpha) if alpha is not None else float(rank)


def write_lycoris(variant: str, components: dict[str, dict[str, torch.Tensor]], configs: dict[str, dict],
                  path, metadata: dict[str, str], naming: KohyaNaming = SD_NAMING) -> Path:
    """The LyCORIS file for AUTOMATIC1111 / ComfyUI (models/Lora), atomically; `naming`: the family's kohya names."""
    tensors = to_lycoris(variant, components, configs, naming)
    return save_safetensors(tensors, path, lycoris_metadata(variant, tensors, metadata, naming.version))


def read_lycoris_file(path: str | os.PathLike, module_names: dict[str, list[str]] | None = None) -> AdapterFile:
    """A LyCORIS file as peft's layers; `module_names` (component -> the model's module paths) resolves kohya's
    names exactly, without it they are parsed."""
    tensors, metadata = read_safetensors(path)
    variant, states, configs = from_lycoris(tensors, str(path), module_names)
    return AdapterFile(variant, states, {c: config.to_dict() for c, config in configs.items()},
                       training_header(metadata))


def write_lycoris_file(adapter: AdapterFile, path: str | os.PathLike) -> Path:
    """`adapter` (LoHa or LoKr) as a LyCORIS file; its header gets kohya's network keys."""
    return write_lycoris(adapter.variant, adapter.states, adapter.configs, path, adapter.metadata)
