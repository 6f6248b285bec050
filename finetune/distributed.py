"""Whole weights and optimizer state from a module that FSDP2 has sharded, and back.

Under FSDP2 (`torch.distributed.fsdp.fully_shard`, what accelerate's `fsdp_version: 2` applies) each parameter is a
DTensor of which every process holds one slice. A checkpoint or a saved pipeline needs the whole tensors, so
they are gathered with torch's own `torch.distributed.checkpoint.state_dict` functions (full state dict, offloaded
to the CPU). Gathering is collective: every process must call these functions at the same point, never the main
process alone. accelerate's own `get_state_dict` (which also sets `broadcast_from_rank0`) returns tensors
safetensors cannot save on a CPU run ("Attempted to access the data pointer on an invalid python storage", seen
with accelerate 1.15), so torch's functions are used directly.

It sits at the package's top level, below both the loop and the strategies, since both gather and load through it.

Without sharding every function here is the plain `state_dict` / `load_state_dict` it stands for.
"""
from __future__ import annotations

from typing import Any

import torch


def is_sharded(module: torch.nn.Module) -> bool:
    """True when any parameter of `module` is a DTensor (FSDP2 has sharded it)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def local_fraction(module: torch.nn.Module) -> float:
    """The share of `module`'s parameter elements this process holds: 1.0 unsharded, about 1/N over N processes."""
    from torch.distributed.tensor import DTensor

    total = local = 0
    for p in module.parameters():
        total += p.numel()
        local += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
    return local / total if total else 1.0


def _full() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of `module` whole (on the CPU when sharded; collective then)."""
    if not is_sharded(module):
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_full())


def load_full_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load whole tensors into `module`, each process keeping its slice when sharded (collective then)."""
    if not is_sharded(module):
        module.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))


def _sharded(modules: list[torch.nn.Module]) -> torch.nn.Module | None:
    found = [m for m in modules if is_sharded(m)]
    if len(found) > 1:
        raise ValueError("more than one sharded module trains; FSDP here shards the denoiser alone")
    return found[0] if found else None


def _inner(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps torch's


def optimizer_state_dict(optimizer: Any, modules: list[torch.nn.Module]) -> dict[str, Any]:
    """The optimizer's state; whole (keyed by parameter name, on the CPU) when one of `modules` is sharded."""
    owner = _sharded(modules)
    if owner is None:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(owner, _inner(optimizer), options=_full())


def load_optimizer_state_dict(optimizer: Any, modules: list[torch.nn.Module], state: dict[str, Any]) -> None:
    """The inverse of `optimizer_state_dict` (collective when sharded)."""
    owner = _sharded(modules)
    if owner is None:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(owner, _inner(optimizer), state, options=StateDictOptions(full_state_dict=True))


def unsharded_copy(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain (unsharded) module of `module`'s own class and config holding `state`, built without allocating
    random weights first; for writing a pipeline on the main process after the state was gathered."""
    from accelerate import init_empty_weights
    from torch.distributed.fsdp import FSDPModule

    # fully_shard swaps the class for a subclass of (FSDPModule, the model's class)
    cls = next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))
    with init_empty_weights():
        copy = cls.from_config(module.config)
    copy.load_state_dict(state, assign=True)
    return copy
