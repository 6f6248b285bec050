"""Optimizer and learning-rate schedule, stepped once per optimizer step.

Convention: step N of a run (1-based, as history.jsonl counts) trains at base rate x factor(N - 1), where factor is
diffusers' schedule (get_scheduler) except in the warmup: diffusers ramps i / warmup from i = 0, so the first step
would train at rate 0 (and a 1-step run with 1 warmup step would not train at all). Here step N of the warmup
trains at N / warmup of the rate, reaching the full rate at step `warmup` as kohya's and most trainers' ramps do;
the decay after the warmup is diffusers' own, so a schedule without warmup is unchanged.
"""
from __future__ import annotations

from typing import Any, Callable

import torch


def build_optimizer(groups: list[dict[str, Any]], kind: str, betas: tuple[float, float], weight_decay: float,
                    eps: float, device_type: str = "cpu") -> torch.optim.Optimizer:
    """`kind` "adamw" (torch's) or "adamw8bit" (bitsandbytes') over `groups`, for parameters that train on a
    `device_type` device ("cuda", "cpu", ...: the accelerator's, where preparing the run puts them). On CUDA
    torch's AdamW is the fused one: one kernel for every parameter's update instead of a dozen launches per
    tensor group, its step counter on the GPU, and with fp16's GradScaler it checks for overflow on the GPU
    instead of reading a flag back each step (torch's `_step_supports_amp_scaling`)."""
    if kind == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, betas=betas, weight_decay=weight_decay, eps=eps)
    if device_type == "cuda":
        return torch.optim.AdamW(groups, betas=betas, weight_decay=weight_decay, eps=eps, fused=True)
    # elsewhere torch would loop over the tensors one by one (foreach is its default on CUDA only): a dozen operators
    # per tensor each step. foreach does the same arithmetic in one operator per update (bit for bit on the CPU)
    return torch.optim.AdamW(groups, betas=betas, weight_decay=weight_decay, eps=eps, foreach=True)


def _warmup_from_one(factor: Callable[[int], float], warmup_steps: int) -> Callable[[int], float]:
    # a plain function (not a callable object), so the scheduler's state_dict keeps nothing of it and a
    # checkpoint stays plain tensors and numbers
    def shifted(index: int) -> float:
        # diffusers' factor(warmup) is the decay's start, 1.0 for every schedule it has
        return factor(index + 1) if index < warmup_steps else factor(index)

    return shifted


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int):
    """diffusers' `name` schedule (constant, constant_with_warmup, linear, cosine, ...) with the warmup counted
    from 1 (module docstring); the optimizer's groups hold the rate of step 1 when it returns."""
    from diffusers.optimization import get_scheduler

    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
    scheduler.lr_lambdas = [_warmup_from_one(factor, warmup_steps) for factor in scheduler.lr_lambdas]
    set_base_rates(scheduler, scheduler.base_lrs)
    return scheduler


def set_base_rates(scheduler, rates: list[float]) -> list[float]:
    """Make `rates` (one per optimizer param group) the schedule's base rates, and put into each group the rate
    of the scheduler's next step (base x factor at its position, computed as the scheduler's own step does).
    On resume this overrides what the checkpoint restored: the recipe's rates and schedule rule from the resumed
    step on. Returns the rates the groups now hold."""
    scheduler.base_lrs = list(rates)
    now = [base * factor(scheduler.last_epoch) for factor, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
    for group, base, lr in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, now):
        group["initial_lr"] = base
        group["lr"] = lr
    scheduler._last_lr = list(now)  # what get_last_lr() reports, as after the scheduler's own step
    return now
