"""Optimizer and learning-rate schedule, stepped once per optimizer step."""
from __future__ import annotations

from typing import Any

import torch


def build_optimizer(groups: list[dict[str, Any]], kind: str, betas: tuple[float, float], weight_decay: float,
                    eps: float) -> torch.optim.Optimizer:
    if kind == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, betas=betas, weight_decay=weight_decay, eps=eps)
    return torch.optim.AdamW(groups, betas=betas, weight_decay=weight_decay, eps=eps)


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int):
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
