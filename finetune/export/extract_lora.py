"""`finetune extract-lora`: the compact form of a whole-model fine-tune, as a LoRA file diffusers loads.

Per Linear and Conv2d layer, the change (tuned - base) is factored by SVD and the top `rank` singular
directions kept: up = U sqrt(S), down = sqrt(S) V^T, so up @ down is the best rank-r approximation of the
change (Eckart-Young). A layer whose full rank is below `rank` is kept exactly, at its own rank (peft's
rank_pattern). Changed biases ride along as peft's `lora_bias`. Changes that LoRA cannot carry (norm layers,
token embeddings) are counted and reported, not silently dropped.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from finetune.export.lora import diffusers as diffusers_lora
from finetune.io.safetensors_io import training_metadata

@dataclass
class Extracted:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # peft keys, without the component prefix
    ranks: dict[str, int] = field(default_factory=dict)  # module name -> rank kept
    has_bias: bool = False
    not_carried: list[str] = field(default_factory=list)  # changed parameters outside Linear/Conv2d layers

    def config(self, rank: int) -> dict:
        pattern = {name: r for name, r in self.ranks.items() if r != rank}
        # alpha equal to each rank: scale 1, so up @ down is added as it is
        return {"r": rank, "lora_alpha": rank, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
                "target_modules": sorted(self.ranks), "lora_bias": self.has_bias, "use_dora": False,
                "lora_dropout": 0.0, "bias": "none", "init_lora_weights": True}


def low_rank_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) with up @ down the best rank-`rank` approximation of `delta` (Linear or Conv2d weight)."""
    out_features = delta.shape[0]
    flat = delta.reshape(out_features, -1).float()
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    up = u[:, :r] * root
    down = root[:, None] * vh[:r]
    if delta.ndim == 4:  # conv: down keeps the kernel, up is 1x1 (how peft builds a conv LoRA)
        return down.reshape(r, *delta.shape[1:]), up.reshape(out_features, r, 1, 1)
    return down, up


def extract_component(tuned: torch.nn.Module, base: torch.nn.Module, rank: int) -> Extracted:
    """The LoRA of `tuned` - `base` (one component) at `rank`; raises ValueError for quantised weights."""
    from finetune.models.quantize import refuse_quantized

    for module in (tuned, base):
        refuse_quantized(module, "extracting a LoRA")
    result = Extracted()
    base_modules = dict(base.named_modules())
    carried: set[str] = set()
    changed_biases: dict[str, torch.Tensor] = {}
    for name, module in tuned.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or getattr(module, "groups", 1) != 1:
            continue
        original = base_modules[name]
        delta = module.weight.detach().float() - original.weight.detach().float().to(module.weight.device)
        bias_delta = None
        if module.bias is not None:
            bias_delta = module.bias.detach().float() - original.bias.detach().float().to(module.bias.device)
        carried.update({f"{name}.weight", f"{name}.bias"})
        if not delta.any() and (bias_delta is None or not bias_delta.any()):
            continue
        down, up = low_rank_factors(delta, rank)
        result.tensors[f"{name}.lora_A.weight"] = down.contiguous()
        result.tensors[f"{name}.lora_B.weight"] = up.contiguous()
        result.ranks[name] = down.shape[0]
        if bias_delta is not None and bias_delta.any():
            changed_biases[name] = bias_delta
    if changed_biases:
        # lora_bias gives every adapted layer a bias; layers whose bias did not change get zeros
        result.has_bias = True
        for name in result.ranks:
            out_features = result.tensors[f"{name}.lora_B.weight"].shape[0]
            result.tensors[f"{name}.lora_B.bias"] = changed_biases.get(name, torch.zeros(out_features))
    base_params = dict(base.named_parameters())
    result.not_carried = [name for name, p in tuned.named_parameters()
                          if name not in carried and not torch.equal(p.detach().float().cpu(),
                                                                     base_params[name].detach().float().cpu())]
    return result


def extract_lora(tuned: str, base: str, rank: int, out: str | Path, device: str = "cpu",
                 save_dtype: torch.dtype = torch.float32) -> tuple[Path, dict[str, Extracted]]:
    from finetune.export.family_header import family_fields, family_version
    from finetune.models import family_for
    from finetune.models.base import adaptable_modules

    if rank < 1:
        raise ValueError(f"--rank: must be at least 1, got {rank}")
    if not (Path(tuned) / "model_index.json").is_file():
        raise ValueError(f"--tuned: {tuned} is not a diffusers pipeline folder (no model_index.json); "
                         "give the `pipeline` folder a DreamBooth run wrote")
    family = family_for("auto", base, hub=True)
    tuned_parts, base_parts = family.load(tuned), family.load(base)
    results: dict[str, Extracted] = {}
    base_modules = adaptable_modules(base_parts)
    for component, tuned_module in adaptable_modules(tuned_parts).items():  # the denoiser and text encoders
        tuned_module, base_module = tuned_module.to(device), base_modules[component].to(device)
        result = extract_component(tuned_module, base_module, rank)
        if result.ranks:
            results[component] = result
    if not results:
        raise ValueError(f"{tuned} and {base} have the same Linear and Conv2d weights: nothing to extract")
    components = {name: {k: v.to("cpu", save_dtype) for k, v in r.tensors.items()} for name, r in results.items()}
    configs = {name: r.config(rank) for name, r in results.items()}
    source = _source_metadata(Path(tuned))
    metadata = training_metadata(base_model=source.get("finetune.base_model", base), strategy="lora",
                                 steps=int(source.get("finetune.steps", 0)),
                                 recipe=json.loads(source.get("finetune.recipe", "{}")),
                                 extra={"rank": rank, "alpha": rank, "extracted_from": str(tuned)})
    # the keys AUTOMATIC1111 and Forge tell the family by, as a training run's files carry them
    metadata.update(family_fields(family_version(family, base_parts), "lora", metadata["finetune.base_model"]))
    path = diffusers_lora.save_lora(Path(out), components, configs, metadata)
    return path, results


def _source_metadata(tuned: Path) -> dict[str, str]:
    """The training metadata a DreamBooth run left in its pipeline folder, if any."""
    path = tuned / "finetune.json"
    return json.loads(path.read_text()) if path.is_file() else {}
