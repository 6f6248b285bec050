"""`finetune resize`: re-rank a LoRA by SVD, to a rank or to the fraction of each layer's energy to keep.

Per layer, the change the LoRA makes (up @ down * alpha / rank) is factored by SVD and the top k singular
directions kept (the best rank-k approximation, Eckart-Young). Energy is the squared Frobenius norm, i.e. the
sum of squared singular values; "energy kept" is the share of it the new layer keeps. alpha is set to k, so the
factors carry the whole change (scale 1).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune.export.lora.files import read_lora
from finetune.export.lora.layers import LoraFileError, LoraLayer, LoraWeights


@dataclass
class LayerReport:
    component: str
    module: str
    old_rank: int
    new_rank: int
    energy_kept: float  # in [0, 1]


def resize_layer(layer: LoraLayer, rank: int | None, energy: float | None) -> tuple[LoraLayer, float]:
    delta = layer.delta().double()
    flat = delta.reshape(delta.shape[0], -1)
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    squares = s.square()
    total = float(squares.sum())
    limit = min(layer.rank, s.numel())
    k = limit
    if energy is not None and total > 0:
        cumulative = (squares.cumsum(0) / total).tolist()
        # the fewest directions whose energy reaches the target (float round-off must not ask for one more)
        k = next((i + 1 for i, share in enumerate(cumulative) if share >= energy - 1e-12), limit)
    if rank is not None:
        k = min(k, rank)
    k = max(1, min(k, limit))
    kept = float(squares[:k].sum()) / total if total > 0 else 1.0
    root = s[:k].sqrt()
    up = u[:, :k] * root
    down = root[:, None] * vh[:k]
    dtype = layer.down.dtype
    if delta.ndim == 4:  # conv: down keeps the kernel, up is 1x1
        down = down.reshape(k, *delta.shape[1:])
        up = up.reshape(delta.shape[0], k, 1, 1)
    return LoraLayer(down.to(dtype).contiguous(), up.to(dtype).contiguous(), float(k), None, layer.bias), kept


def resize(weights: LoraWeights, rank: int | None, energy: float | None) -> tuple[LoraWeights, list[LayerReport]]:
    if rank is None and energy is None:
        raise LoraFileError("give --rank N, --energy FRACTION (e.g. 0.9), or both (energy, capped at rank)")
    if rank is not None and rank < 1:
        raise LoraFileError(f"--rank: must be at least 1, got {rank}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise LoraFileError(f"--energy: a fraction in (0, 1], got {energy}")
    if weights.uses_dora:
        raise LoraFileError("DoRA layers renormalise the whole weight, so an SVD of the low-rank part alone does "
                            "not say what is kept; resize works on plain LoRA files")
    layers: dict[str, dict[str, LoraLayer]] = {}
    reports = []
    for component, module, layer in weights.modules():
        new, kept = resize_layer(layer, rank, energy)
        layers.setdefault(component, {})[module] = new
        reports.append(LayerReport(component, module, layer.rank, new.rank, kept))
    return LoraWeights(layers, dict(weights.metadata)), reports


def summary(reports: list[LayerReport]) -> list[str]:
    kept = [r.energy_kept for r in reports]
    old = sorted({r.old_rank for r in reports})
    new = [r.new_rank for r in reports]
    worst = sorted(reports, key=lambda r: r.energy_kept)[:3]
    span = lambda values: str(values[0]) if len(set(values)) == 1 else f"{min(values)}-{max(values)}"  # noqa: E731
    lines = [f"{len(reports)} layers, rank {span(old)} -> {span(sorted(new))} (median {statistics.median(new):g})",
             f"energy kept per layer: min {min(kept):.4f}, median {statistics.median(kept):.4f}, "
             f"mean {statistics.fmean(kept):.4f}, max {max(kept):.4f}",
             "least kept: " + ", ".join(f"{r.component}.{r.module} {r.energy_kept:.4f}" for r in worst)]
    if any(math.isnan(k) for k in kept):
        lines.append("warning: some layers' energy is not a number (NaN weights in the file)")
    return lines


def resize_file(source: str | Path, out: str | Path, rank: int | None, energy: float | None,
                base: str | None = None) -> tuple[Path, list[LayerReport]]:
    """Resize `source` into `out`, in the same format (kohya stays kohya); `base` resolves kohya's names against
    the model's modules (needed for an SDXL-layout file of another U-Net shape than the released one)."""
    from finetune.export.lora import diffusers as diffusers_lora
    from finetune.export.lora import kohya as kohya_lora

    module_names = None
    if base is not None:
        from finetune.models import family_for

        module_names = kohya_lora.module_paths(family_for("auto", base, hub=True).load(base))
    weights = read_lora(source, module_names)
    resized, reports = resize(weights, rank, energy)
    resized.metadata["finetune.resized_from"] = Path(source).name
    if weights.format == "kohya":
        path = kohya_lora.write_kohya(resized, Path(out))
    else:
        path = diffusers_lora.write_diffusers(resized, Path(out))
    return path, reports
