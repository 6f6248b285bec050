"""The optimizers `train.optimizer` names: where each comes from, which arguments it takes, and how it is built.

Each is its library's own class, not written here. The reference implementations were chosen over one collection
(pytorch-optimizer) where they differ: after 50 steps on a small least-squares problem pytorch-optimizer's Prodigy
ends 2.8% (relative L2) away from prodigyopt's and its AdaFactor 5.5% away from transformers' (fairseq's port),
while its Lion and ScheduleFreeAdamW match lion-pytorch and schedulefree to float rounding.

- adamw: torch.optim.AdamW (fused on CUDA, foreach elsewhere); adamw8bit: bitsandbytes' AdamW8bit.
- prodigy: prodigyopt.Prodigy (Mishchenko & Defazio 2023, the authors' package): it estimates the step size
  itself; the learning rate multiplies that estimate (1.0 is usual).
- adafactor: transformers' Adafactor (Shazeer & Stern 2018, a port of fairseq's). By default its relative step
  sets the rate (min(1e-2, 1/sqrt(step)) x each weight's RMS), so the recipe's rate and schedule do not apply;
  optimizer_args relative_step: false makes it take them.
- lion: lion_pytorch.Lion (Chen et al. 2023, the paper's update rule): sign updates, usually a rate 3-10x
  smaller than AdamW's.
- schedule_free_adamw: schedulefree.AdamWScheduleFree (Defazio et al. 2024, the authors' package): no schedule,
  its own warmup (train.lr_warmup_steps); the weights a run shows and saves are its averaged point (`eval_view`).

The recipe's adam_* keys reach an optimizer only where its argument means the same thing (ADAM_KEYS):
adam_beta1/2 -> betas and adam_epsilon -> eps for the Adam-like ones (prodigy, schedule-free AdamW), and
adam_weight_decay -> weight_decay wherever the decay is decoupled as AdamW's (every one here). Lion's betas play
other roles and Adafactor's eps is a pair of floors, so those keep their library's defaults. optimizer_args wins
over a mapped key.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

ADAM_KEYS = ("betas", "eps", "weight_decay")


@dataclass(frozen=True)
class OptimizerKind:
    """One entry of the registry: where the class lives, what to install for it, which adam_* keys it takes."""

    module: str
    class_name: str
    package: str  # the distribution pip installs
    install: str  # the command that installs it: finetune's extra, or the package a dependency already brings
    adam_keys: tuple[str, ...]  # which of ADAM_KEYS mean here what they mean for AdamW
    default_lr: str  # what the summary says about the learning rate it wants


EXTRA = "pip install 'finetune[optimizers]'"
REGISTRY: dict[str, OptimizerKind] = {
    "adamw": OptimizerKind("torch.optim", "AdamW", "torch", "pip install torch", ADAM_KEYS, "1e-4 for LoRA"),
    "adamw8bit": OptimizerKind("bitsandbytes.optim", "AdamW8bit", "bitsandbytes", "pip install 'finetune[bnb]'",
                               ADAM_KEYS, "as AdamW"),
    "prodigy": OptimizerKind("prodigyopt", "Prodigy", "prodigyopt", EXTRA, ADAM_KEYS,
                             "1.0: a multiplier of the step size it finds"),
    "adafactor": OptimizerKind("transformers.optimization", "Adafactor", "transformers", "pip install transformers",
                               ("weight_decay",), "its relative step, unless relative_step: false"),
    "lion": OptimizerKind("lion_pytorch", "Lion", "lion-pytorch", EXTRA, ("weight_decay",),
                          "3-10x smaller than AdamW's"),
    "schedule_free_adamw": OptimizerKind("schedulefree", "AdamWScheduleFree", "schedulefree", EXTRA, ADAM_KEYS,
                                         "as AdamW or a little higher; constant"),
}
# set by build(), from the recipe's rate and the device: refused in optimizer_args
_SET_HERE = {"params": "the trained parameters", "lr": "train.learning_rate (or strategy.learning_rate)"}
PRODIGY_LOWEST_RATE = 0.1  # below this a Prodigy rate is an AdamW habit (1e-4), not a multiplier of its own


class OptimizerUnavailable(ImportError):
    """The optimizer's package does not import; the message names the extra that installs it."""


def optimizer_class(name: str) -> type:
    """The class `train.optimizer: name` builds. Raises OptimizerUnavailable naming the extra to install."""
    kind = REGISTRY[name]
    try:
        return getattr(importlib.import_module(kind.module), kind.class_name)
    except Exception as exc:  # not installed, or built for another torch (ImportError, RuntimeError)
        raise OptimizerUnavailable(
            f"train.optimizer: {name} needs {kind.package}, which does not import here ({type(exc).__name__}: "
            f"{str(exc)[:120]}); {kind.install}, or set train.optimizer: adamw") from None


def constructor_arguments(cls: type) -> list[str]:
    """The keyword arguments `cls`'s constructor takes, besides params (its real signature, read by inspect)."""
    return [name for name, p in inspect.signature(cls.__init__).parameters.items()
            if name not in ("self", "params") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def uses_relative_step(name: str, args: dict[str, Any]) -> bool:
    """Whether Adafactor sets its own rate (its default): then train.learning_rate and the schedule do not apply."""
    return name == "adafactor" and bool(args.get("relative_step", True))


def keyword_arguments(name: str, args: dict[str, Any], lr: float, betas: tuple[float, float], weight_decay: float,
                      eps: float, warmup_steps: int = 0, device_type: str = "cpu") -> dict[str, Any]:
    """What the constructor gets: the recipe's rate, the adam_* values this optimizer reads the same way, its
    device defaults (adamw: fused on CUDA, foreach elsewhere), the warmup for schedule-free AdamW, then
    `args` (train.optimizer_args) over all of them."""
    mapped = {"betas": betas, "eps": eps, "weight_decay": weight_decay}
    kwargs: dict[str, Any] = {"lr": None if uses_relative_step(name, args) else lr}
    kwargs.update({key: mapped[key] for key in REGISTRY[name].adam_keys})
    if name == "adamw":
        # on CUDA one kernel for every parameter's update, its step counter on the GPU (and GradScaler's overflow
        # check there too); elsewhere torch would loop tensor by tensor, foreach does the same arithmetic (bit
        # for bit on the CPU) in one operator per update
        kwargs.update({"fused": True} if device_type == "cuda" else {"foreach": True})
    if name == "schedule_free_adamw":
        kwargs["warmup_steps"] = warmup_steps
    kwargs.update(args)
    return kwargs


def build(groups: list[dict[str, Any]], name: str, args: dict[str, Any], **recipe_values) -> torch.optim.Optimizer:
    """`name`'s optimizer over `groups` (each with its "lr"), `recipe_values` as keyword_arguments takes them.
    A schedule-free one is put in train mode (it refuses to step otherwise). Adafactor's relative step takes no
    rate: its groups hold 1.0, which it ignores, so that the schedule (relative_step_rate) can say the rate it
    uses. Raises OptimizerUnavailable when the package is missing."""
    cls = optimizer_class(name)
    kwargs = keyword_arguments(name, args, **recipe_values)
    relative = uses_relative_step(name, args)
    if relative:
        groups = [{key: value for key, value in group.items() if key != "lr"} for group in groups]
    optimizer = cls(groups, **kwargs)
    if relative:
        for group in optimizer.param_groups:
            group["lr"] = 1.0
    if name == "schedule_free_adamw":
        optimizer.train()
    return optimizer


def relative_step_rate(args: dict[str, Any]) -> Callable[[int], float]:
    """Adafactor's relative step size at step index i (0-based), before its scale_parameter factor (the weight's
    RMS): min(1e-6 (i + 1) if warmup_init else 1e-2, 1 / sqrt(i + 1)), as transformers' Adafactor._get_lr has it.
    The schedule's factor, for the logged rate only: the optimizer computes its own."""
    warmup_init = bool(args.get("warmup_init", False))

    def rate(index: int) -> float:
        step = index + 1
        return min(1e-6 * step if warmup_init else 1e-2, 1.0 / math.sqrt(step))

    return rate


@contextmanager
def eval_view(optimizer) -> Iterator[None]:
    """Schedule-free AdamW's averaged point x in the trained parameters (its eval mode), the point y it steps from
    back on leaving. Put back from a copy, not by its train(): train() recomputes y from x by a lerp, which is not
    bit-exact, and a run that drew a sample grid would then train on other bits than one that did not (and
    than its own resume)."""
    groups = optimizer.param_groups
    kept = [[p.detach().clone() for p in group["params"]] for group in groups]
    optimizer.eval()
    try:
        yield
    finally:
        with torch.no_grad():
            for group, copies in zip(groups, kept):
                for p, copy in zip(group["params"], copies):
                    p.copy_(copy)
                group["train_mode"] = True  # what train() sets; the weights are y again


def weight_views(name: str, optimizer) -> list[Callable]:
    """What `name`'s optimizer adds to Run.weight_views (training/shown_weights.py): schedule-free AdamW's averaged
    point for grids, snapshots and the artifact; nothing for the others. `optimizer`: as prepared (accelerate's
    wrapper or the optimizer itself)."""
    if name != "schedule_free_adamw":
        return []
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer holds the real one
    return [lambda: eval_view(inner)]


def problems(name: str, args: dict[str, Any], learning_rate: float, lr_scheduler: str,
             lr_warmup_steps: int) -> list[str]:
    """What is wrong with train.optimizer / optimizer_args, before any model loads: a package missing (naming the
    extra), an argument its constructor does not take (naming the valid ones and the closest), one finetune sets
    itself, a value the library refuses (it is built once on a 1-element tensor), and the rates and schedules
    that cannot apply: `learning_rate` is the rate the denoiser's parameters train at."""
    try:
        cls = optimizer_class(name)
    except OptimizerUnavailable as exc:
        return [str(exc)]
    found = []
    valid = constructor_arguments(cls)
    for key in args:
        if key in _SET_HERE:
            found.append(f"train.optimizer_args: {key} is set from {_SET_HERE[key]}; remove it")
        elif key not in valid:
            guess = difflib.get_close_matches(key, valid, n=1)
            found.append(f"train.optimizer_args: {name} ({REGISTRY[name].module}.{REGISTRY[name].class_name}) takes "
                         f"no argument {key!r}" + (f"; did you mean {guess[0]!r}?" if guess else "")
                         + f" Its arguments: {', '.join(a for a in valid if a not in _SET_HERE)}")
    if found:
        return found
    try:
        build([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": learning_rate}], name, args,
              lr=learning_rate, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8, warmup_steps=lr_warmup_steps)
    except Exception as exc:  # the library's own checks of its values (ValueError, AssertionError, TypeError)
        why = str(exc)[:200] or "a check in its constructor failed"
        return [f"train.optimizer_args: {name} refuses {args}: {type(exc).__name__}: {why}"]
    return _rate_problems(name, args, learning_rate, lr_scheduler, lr_warmup_steps)


def _rate_problems(name: str, args: dict[str, Any], learning_rate: float, lr_scheduler: str,
                   lr_warmup_steps: int) -> list[str]:
    found = []
    if name == "prodigy" and learning_rate < PRODIGY_LOWEST_RATE:
        found.append(f"train.learning_rate: {learning_rate:g} with prodigy, whose rate multiplies the step size it "
                     "estimates itself: 1.0 is usual (an AdamW rate like 1e-4 would barely train); set "
                     "learning_rate: 1.0, and optimizer_args d_coef (e.g. 0.5) for smaller steps")
    if uses_relative_step(name, args) and (lr_scheduler != "constant" or lr_warmup_steps):
        found.append(f"train.lr_scheduler: {lr_scheduler} (lr_warmup_steps {lr_warmup_steps}) cannot apply to "
                     "adafactor's relative step, which sets its own rate; set lr_scheduler: constant and "
                     "lr_warmup_steps: 0 (optimizer_args warmup_init: true is its own warmup), or give it a rate "
                     "with optimizer_args relative_step: false")
    if name == "schedule_free_adamw":
        if lr_scheduler not in ("constant", "constant_with_warmup"):
            found.append(f"train.lr_scheduler: {lr_scheduler} with schedule_free_adamw, which needs no schedule (its "
                         "averaging does that work); set lr_scheduler: constant (train.lr_warmup_steps is its "
                         "own warmup)")
        if "warmup_steps" in args and lr_warmup_steps:
            found.append("train.optimizer_args: warmup_steps and train.lr_warmup_steps both set the warmup of "
                         "schedule_free_adamw; keep one")
    return found


def summary_line(name: str, args: dict[str, Any], learning_rate: float, lr_scheduler: str,
                 warmup_steps: int) -> str:
    """The run summary's line for the optimizer: its class, its own arguments, and which rate and schedule apply."""
    kind = REGISTRY[name]
    own = ", ".join(f"{key}={value}" for key, value in sorted(args.items()))
    line = f"optimizer: {name} ({kind.module}.{kind.class_name}{f'; {own}' if own else ''})"
    if uses_relative_step(name, args):
        return (line + ": its relative step sets the rate (train.learning_rate and the schedule do not apply; the "
                       "logged lr is its relative step size, before the weight's RMS factor)")
    if name == "schedule_free_adamw":
        return (line + f": rate {learning_rate:g}, no schedule, warmup {args.get('warmup_steps', warmup_steps)} "
                       "step(s) of its own; grids, snapshots and the artifact hold its averaged weights")
    return line + f": rate {learning_rate:g} (usual: {kind.default_lr}), schedule {lr_scheduler}"
