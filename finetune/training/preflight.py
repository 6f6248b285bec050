"""What a run refuses before anything is read or loaded: work the distributed engine cannot do (training/engine.py),
and what the device cannot run: fp16 on a CPU, 8-bit float matmuls without fp8 (models/quantize.py), attention
kernels it lacks (training/attention.py)."""
from __future__ import annotations

import logging
from typing import Callable

import torch

from finetune.models.quantize import problems_on
from finetune.recipe.load import RecipeError
from finetune.recipe.schema import Recipe
from finetune.training.attention import AttentionKernels, kernels_for
from finetune.training.engine import engine_report, refuse_unsharded_work, requested_engine

log = logging.getLogger(__name__)


def check_engine_and_device(accelerator, recipe: Recipe, base_dtype: torch.dtype,
                            say: Callable[[str | None], None]) -> AttentionKernels:
    """Say which engine runs; refuse (RecipeError, every problem at once) what it or the device cannot do, before
    anything is read. `base_dtype`: the frozen base's. Returns train.attention resolved for the device."""
    engine, mismatch = engine_report(accelerator.distributed_type.name, accelerator.num_processes,
                                     requested_engine())
    say(engine)
    if mismatch and accelerator.is_main_process:
        log.warning(mismatch)
    problems = refuse_unsharded_work(accelerator.distributed_type.name, recipe.strategy.kind,
                                     recipe.strategy.trains_base_weights,
                                     bool(getattr(recipe.strategy, "text_encoder", False)), recipe.sample.every)
    problems += problems_on(recipe.model.quantize, accelerator.device)  # fp8 matmuls on a GPU without fp8
    if recipe.train.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # accelerate applies no fp16 autocast on a CPU, so a half base would meet fp32 inputs and fail
        problems.append("train.mixed_precision: fp16 needs a GPU; on a CPU set train.mixed_precision: bf16 (or no)")
    # attention runs in half precision under autocast, or without it on a half base
    half = recipe.train.mixed_precision in ("fp16", "bf16") or base_dtype != torch.float32
    attention, refused = kernels_for(recipe.train.attention, accelerator.device, half_precision=half)
    problems += refused
    if problems:
        raise RecipeError(recipe.source, problems)
    return attention
