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

from finetune.training import optimizers


def build_optimizer(groups: list[dict[str, Any]], kind: str, betas: tuple[float, float], weight_decay: float,
                    eps: float, device_type: str = "cpu", args: dict[str, Any] | None = None,
                    warmup_steps: int = 0) -> torch.optim.Optimizer:
    """`kind` (train.optimizer, a name in training/optimizers.py's REGISTRY) over `groups`, for parameters that
    train on a `device_type` device ("cuda", "cpu", ...: the accelerator's, where preparing the run puts them);
    `args`: train.optimizer_args; `warmup_steps`: train.lr_warmup_steps (schedule-free AdamW's own warmup). AdamW
    is torch's, fused on CUDA and foreach elsewhere (optimizers.keyword_arguments says why)."""
    return optimizers.build(groups, kind, dict(args or {}), lr=groups[0]["lr"] if groups else 0.0, betas=betas,
                            weight_decay=weight_decay, eps=eps, warmup_steps=warmup_steps, device_type=device_type)


def schedule_for(kind: str, args: dict[str, Any], name: str, warmup_steps: int,
                 total_steps: int) -> tuple[str, int, int, Callable[[int], float] | None]:
    """build_scheduler's arguments after the optimizer for optimizer `kind`: the recipe's schedule, except where
    the optimizer schedules itself: schedule-free AdamW (constant; its warmup is its own) and Adafactor's relative
    step (a factor that only reports the rate it uses: optimizers.relative_step_rate)."""
    if optimizers.uses_relative_step(kind, args):
        return "constant", 0, total_steps, optimizers.relative_step_rate(args)
    if kind == "schedule_free_adamw":
        return "constant", 0, total_steps, None
    return name, warmup_steps, total_steps, None


def _warmup_from_one(factor: Callable[[int], float], warmup_steps: int) -> Callable[[int], float]:
    # a plain function (not a callable object), so the scheduler's state_dict keeps nothing of it and a
    # checkpoint stays plain tensors and numbers
    def shifted(index: int) -> float:
        # diffusers' factor(warmup) is the decay's start, 1.0 for every schedule it has
        return factor(index + 1) if index < warmup_steps else factor(index)

    return shifted


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int,
                    factor: Callable[[int], float] | None = None):
    """diffusers' `name` schedule (constant, constant_with_warmup, linear, cosine, ...) with the warmup counted
    from 1 (module docstring), or `factor` (of the 0-based step index) instead when given (schedule_for); the
    optimizer's groups hold the rate of step 1 when it returns."""
    from diffusers.optimization import get_scheduler

    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
    scheduler.lr_lambdas = [factor or _warmup_from_one(rule, warmup_steps) for rule in scheduler.lr_lambdas]
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
