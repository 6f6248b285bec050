"""train.ema: an exponential moving average (EMA) of the trained weights, shown and saved in their place.

What it averages: the optimizer's parameters (LoRA's adapter weights, DreamBooth's base weights, textual
inversion's embedding matrices, a hypernetwork's MLPs), so it works for every strategy without knowing it; each
strategy's `save` then writes whatever the parameters hold. The average is kept in fp32, on the accelerator or in
CPU memory (`device: cpu`, for large DreamBooth runs), and updated after every `update_every` optimizer steps.

Decay warm-up: the average is bias-corrected as Adam's moments are (Kingma & Ba 2015, section 3): started from
zero, divided by 1 - decay^n after n updates. In place, the n-th update is a lerp towards the weights with weight
(1 - decay) / (1 - decay^n): 1 at the first update (the average starts at the first trained weights, not at the
untrained ones) and falling to 1 - decay. So `decay` means what it says from the start (an average over about
1 / (1 - decay) updates), where diffusers' EMAModel caps it at (1 + n) / (10 + n), which keeps a 0.999 decay
below 0.99 for the first 990 updates, most of a LoRA run.

Why not diffusers' EMAModel: its `step` subtracts each parameter from its shadow, which fails when the shadow is in
CPU memory and the parameter on the GPU (its training scripts' offload_ema moves the whole shadow to the GPU and
back around every update, so the GPU holds it at the peak anyway); it copies, rather than averages, a parameter
that stopped requiring gradients; and its store/restore keep a second full copy of the weights on the host.

`device: cpu`: each update queues a copy of the weights into pinned host memory behind the optimizer step and
applies it at the next update (or when the average is read), so the host waits only for a step already done,
never for the one running; no value is read on the host.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch

from finetune.recipe.schema import EmaOptions

RAW_FOLDER = "raw"  # beside the artifact (output_dir/raw/, snapshots/step-N/raw/): the weights as trained


class WeightAverage:
    """The EMA of `params` (fp32 tensors, each trained by the optimizer). `shadow_device`: where the average
    lives; "cpu" stages each update through pinned host memory (see the module's docstring)."""

    def __init__(self, params: list[torch.nn.Parameter], options: EmaOptions, shadow_device: torch.device):
        not_fp32 = sorted({str(p.dtype) for p in params if p.dtype != torch.float32})
        if not_fp32:  # the view swaps contents with the average: only exact when both are fp32
            raise ValueError(f"train.ema averages fp32 trained weights; these train in {', '.join(not_fp32)}")
        self.params, self.options = params, options
        self.shadow = [p.detach().to(shadow_device, copy=True) for p in params]
        self.updates = 0  # updates applied, or staged (then `staged_weight` is set)
        self.staged = shadow_device.type == "cpu" and options.device == "cpu"
        self.staging: list[torch.Tensor] = []
        self.staged_weight: Optional[float] = None
        self.copied: Any = None  # the CUDA event recorded behind the staging copy
        self.showing = False

    def lerp_weight(self, n: int) -> float:
        """Weight of the weights in the n-th update (n >= 1): (1 - d) / (1 - d^n), the bias-corrected EMA."""
        d = self.options.decay
        return 1.0 if d == 0 else (1.0 - d) / (1.0 - d ** n)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Call after every optimizer step (`step` steps done, after strategy.on_step_end, which may restore
        frozen rows); updates the average every `update_every` steps. Queues device work only."""
        if step % self.options.update_every:
            return
        if self.showing:
            raise RuntimeError("train.ema: an update while the average is shown")
        self.updates += 1
        weight = self.lerp_weight(self.updates)
        if not self.staged:
            torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], weight)
            return
        self._apply_staged()  # the previous update's copy: done by now (a step ago), so this seldom waits
        if not self.staging:
            pin = any(p.device.type == "cuda" for p in self.params)
            self.staging = [torch.empty_like(s, pin_memory=pin) for s in self.shadow]
        for buffer, p in zip(self.staging, self.params):
            buffer.copy_(p.detach(), non_blocking=True)
        self.copied = None
        if any(p.device.type == "cuda" for p in self.params):
            self.copied = torch.cuda.Event()
            self.copied.record()
        self.staged_weight = weight

    def _apply_staged(self) -> None:
        if self.staged_weight is None:
            return
        if self.copied is not None:
            self.copied.synchronize()
        torch._foreach_lerp_(self.shadow, self.staging, self.staged_weight)
        self.staged_weight = None

    @contextmanager
    def shown(self) -> Iterator[None]:
        """Within the context the parameters hold the average and the average the trained weights; both come
        back bit-exact on leaving. Swapped one parameter at a time in place (the extra memory is the largest
        parameter; tensors keep their storage, so compiled graphs and the optimizer see the same tensors)."""
        with torch.no_grad():
            self._apply_staged()
            self._swap()
        self.showing = True
        try:
            yield
        finally:
            self.showing = False
            with torch.no_grad():
                self._swap()

    def _swap(self) -> None:
        for p, s in zip(self.params, self.shadow):
            held = p.detach().clone()
            p.copy_(s)
            s.copy_(held)

    @torch.no_grad()
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the update count and the average (on the CPU), in the optimizer's order."""
        self._apply_staged()
        return {"updates": self.updates, "shadow": [s.detach().cpu() for s in self.shadow]}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of state_dict. Raises ValueError when the shapes do not match the trained parameters."""
        shadow = state["shadow"]
        if len(shadow) != len(self.shadow) or any(a.shape != b.shape for a, b in zip(shadow, self.shadow)):
            raise ValueError("train.ema: the checkpoint's average does not match the trained parameters")
        for mine, saved in zip(self.shadow, shadow):
            mine.copy_(saved)
        self.updates, self.staged_weight = int(state["updates"]), None

    def header(self, shows_average: bool) -> dict[str, str]:
        """The artifact header's keys: which weights the file holds, and how they were averaged."""
        o = self.options
        return {"finetune.ema": "average" if shows_average else "raw (the average is in ../)",
                "finetune.ema_decay": str(o.decay), "finetune.ema_update_every": str(o.update_every),
                "finetune.ema_updates": str(self.updates)}


def plan_line(options: Optional[EmaOptions], max_steps: int) -> list[str]:
    """The run summary's line (none without train.ema)."""
    if options is None:
        return []
    horizon = options.update_every / (1 - options.decay)
    span = (f"about the last {horizon:.0f} steps" if horizon < max_steps
            else f"all {max_steps} steps (the horizon, {horizon:.0f} steps, is longer than the run)")
    return [f"ema: decay {options.decay:g} every {options.update_every} step(s), on the {options.device}, "
            f"averaging {span}; the artifact, snapshots and sample grids show the average, the trained weights "
            f"are saved beside it in {RAW_FOLDER}/"]


def start(options: Optional[EmaOptions], optimizer, accelerator) -> Optional[WeightAverage]:
    """The run's average of the optimizer's parameters (None without train.ema). Raises ValueError under FSDP or
    DeepSpeed: each process holds a shard of the weights, which the average and its view do not gather."""
    if options is None:
        return None
    if accelerator.distributed_type.name in ("FSDP", "DEEPSPEED"):
        raise ValueError(f"train.ema: not with {accelerator.distributed_type.name} (the weights are sharded "
                         f"across processes); train with one process or DDP, or leave train.ema out")
    device = torch.device("cpu") if options.device == "cpu" else accelerator.device
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return WeightAverage(params, options, device)


def problems(options: Optional[EmaOptions], optimizer: str, max_steps: int) -> list[str]:
    """What `finetune validate` refuses in train.ema (recipe/checks.py)."""
    if options is None:
        return []
    found = []
    # decay's bounds, and update_every's least, are declared on the keys (recipe/schema.py: EmaOptions)
    if options.update_every > max_steps:
        found.append(f"train.ema.update_every: must be between 1 and train.max_steps ({max_steps}), got "
                     f"{options.update_every}")
    if optimizer == "schedule_free_adamw":
        found.append("train.ema: not with train.optimizer: schedule_free_adamw, whose saved weights already are "
                     "an average of its steps; leave train.ema out, or choose another optimizer")
    return found
