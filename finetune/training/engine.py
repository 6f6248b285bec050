"""Which distributed engine a run really got, said before the first step. accelerate turns a request it cannot
meet into something else without a word: version 1.15 on a CPU runs an FSDP config as plain DDP (or as one
process), which gives the same numbers and shards nothing, so a run that only looked at its results would never
know. `accelerate launch` passes the config's choice on in the environment (ACCELERATE_USE_FSDP,
ACCELERATE_USE_DEEPSPEED); what the run got is `accelerator.distributed_type`."""
from __future__ import annotations

import os
from typing import Any, Mapping

# environment variable accelerate launch sets -> the DistributedType name it asks for
REQUESTS = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DEEPSPEED"}
NAMES = {"NO": "one process, no distributed engine", "MULTI_CPU": "DDP over CPU processes (gloo)",
         "MULTI_GPU": "DDP over GPUs", "FSDP": "FSDP (parameters sharded)", "DEEPSPEED": "DeepSpeed"}


def requested_engine(environ: Mapping[str, str] = os.environ) -> str | None:
    """The engine the accelerate config asked for (FSDP or DEEPSPEED), or None for DDP / a single process."""
    return next((engine for key, engine in REQUESTS.items() if environ.get(key, "").lower() in ("1", "true")),
                None)


def has_accelerator() -> bool:
    """A CUDA, MPS or XPU device is there (accelerate is told cpu=True otherwise)."""
    import torch

    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu and xpu.is_available())


def engine_report(got: str, processes: int, asked: str | None) -> tuple[str, str | None]:
    """(the line saying what the run got, a warning when it is not what was asked for, else None); `got` is
    `accelerator.distributed_type.name`."""
    line = f"engine: {NAMES.get(got, got)}, {processes} process(es)"
    if asked is None or asked == got:
        return line, None
    return line, (f"the accelerate config asks for {asked}, but accelerate gave {NAMES.get(got, got)}: nothing is "
                  f"sharded. {asked} needs GPUs (and a multi-GPU launch); the numbers will be those of plain "
                  "training, with its memory")


def refuse_unsharded_work(got: str, strategy_kind: str, trains_base_weights: bool, text_encoder: bool,
                          sample_every: int) -> list[str]:
    """What this run asks that FSDP here does not do, each with its fix (empty: nothing). FSDP shards one model
    (accelerate's FSDP2 prepares one), so it trains the denoiser whole: DreamBooth without the text encoders.
    Sample grids draw on the main process alone, which a sharded model cannot do (every process must take part
    in each forward)."""
    if got != "FSDP":
        return []
    problems = []
    if not trains_base_weights:
        problems.append(f"strategy.kind: {strategy_kind} trains a few MB and fits one GPU; FSDP here is for "
                        "whole-model DreamBooth. Launch it with a DDP (multi-GPU) accelerate config instead")
    elif text_encoder:
        problems.append("strategy.text_encoder: FSDP shards one model, the denoiser; set strategy.text_encoder: false")
    if sample_every:
        problems.append("sample.every: sample grids during a sharded run are not written yet; set sample.every: 0 "
                        "and draw from the saved pipeline with `finetune sample`")
    return problems


def sharding_report(got: str, processes: int, fractions: dict[str, float]) -> tuple[str | None, str | None]:
    """(a line saying how much of each trained module this process holds, a warning when accelerate reports
    FSDP over several processes but nothing is sharded); `fractions`: module name -> distributed.local_fraction.
    The claim comes from the parameters themselves, not from the config."""
    if got != "FSDP":
        return None, None
    held = ", ".join(f"{fraction:.0%} of the {name}'s parameters" for name, fraction in fractions.items())
    line = f"sharding: this process holds {held}"
    if processes > 1 and all(fraction == 1.0 for fraction in fractions.values()):
        return line, ("accelerate reports FSDP, but every parameter is whole on this process: nothing is sharded, "
                      "and each GPU holds the full model")
    return line, None


def enable_gradient_checkpointing(accelerator: Any, parts: Any, trained: list) -> None:
    """Recompute the trained modules' activations in the backward pass (`train.gradient_checkpointing`). Under
    FSDP accelerate wraps each block it shards in a checkpoint before sharding it (its `activation_checkpointing`):
    with the model's own checkpointing (diffusers') the checkpoint would sit outside the sharded blocks, and FSDP2
    does not cast a block's inputs to bf16 when the backward pass recomputes it, so the recomputed tensors differ in
    dtype from the saved ones and the backward fails (seen with Flux on an H200, bf16). Call before preparing."""
    if accelerator.distributed_type.name == "FSDP":
        accelerator.state.fsdp_plugin.activation_checkpointing = True
        return
    parts.enable_gradient_checkpointing(trained)


def prepare_for_training(accelerator: Any, modules: dict[str, Any], optimizer: Any) -> tuple[dict, Any, list]:
    """accelerate's `prepare` of the trained modules and the optimizer in one call, as FSDP2 requires; returns
    (the prepared modules by name, the optimizer, its parameters: FSDP2 swaps them for sharded ones, so the
    gradient clipping must take them from the optimizer)."""
    for module in modules.values():
        module.train()
    *prepared, optimizer = accelerator.prepare(*modules.values(), optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return dict(zip(modules, prepared)), optimizer, params
