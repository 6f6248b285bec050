"""`train.offload`: the frozen weights of some of the denoiser's transformer blocks live in pinned CPU memory and
come to the accelerator only while their block runs, each copied on a side stream while an earlier block computes.

Why not diffusers' group offloading (hooks/group_offloading.py, `apply_group_offloading(block_level, use_stream)`):
it moves every parameter of a block, LoRA's trained ones inside peft's layers included, and with streams it puts
back, on offloading, the pinned copy it took when it was applied, so each step's optimizer update of those LoRA
weights would be undone; it is written for inference. accelerate's hooks move whole modules likewise. musubi-tuner's
block swap streams blocks in the forward and, through backward hooks, in the backward pass; with peft's layers the
trained weights sit inside the swapped blocks, which is what this module adds: only tensors with requires_grad False
move, the trained ones never leave the accelerator (the optimizer steps them there).

How: a forward pre-hook on each streamed block puts device copies of its frozen parameters in place (waiting on the
copy's event, not on the host) and starts copying the next streamed block; a forward post-hook puts the CPU ones back,
dropping the device copies. Gradient checkpointing (required: without it autograd would keep every block's device
copies for the backward pass, and nothing would be saved) runs each block's forward again in the backward pass, so
the same pre-hook brings the weights back for the recomputation, in reverse order (inside the backward pass the
next block is the previous one); the recomputation's saved tensors hold them until that block's backward is done,
and the next block's recomputation (or the end of the backward pass) puts the CPU ones back: at most two streamed
blocks are on the accelerator at once. The weights are read from the CPU tensors at every
copy, so a change made to them between steps is seen; nothing is written back (they are frozen).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

REFUSED_ENGINES = ("FSDP", "DEEPSPEED")


def block_count(blocks: float, total: int) -> int:
    """How many of `total` blocks stream: `blocks` itself when >= 1, else that fraction of them (at least one)."""
    return int(blocks) if blocks >= 1 else max(1, round(blocks * total))


def spread(total: int, count: int) -> list[int]:
    """`count` block positions out of `total`, evenly spread, so that resident blocks compute between streamed
    ones while their copies come (all of them when count >= total)."""
    count = min(count, total)
    return sorted({int((k + 0.5) * total / count) for k in range(count)})


def block_classes(spec: Any, denoiser: torch.nn.Module) -> tuple[str, ...]:
    """Class names of the denoiser's transformer blocks: the family's `offload_blocks`, else its `compile_blocks`,
    else the denoiser's own `_repeated_blocks` (diffusers')."""
    if spec.offload_blocks is not None:
        return tuple(spec.offload_blocks)
    return tuple(spec.compile_blocks or getattr(denoiser, "_repeated_blocks", None) or ())


def transformer_blocks(denoiser: torch.nn.Module, names: tuple[str, ...]) -> list[torch.nn.Module]:
    """The outermost modules of the classes `names`, in the order they were registered (the order they run)."""
    found: list[torch.nn.Module] = []
    inside: set[int] = set()
    for module in denoiser.modules():
        if id(module) in inside or type(module).__name__ not in names:
            continue
        found.append(module)
        inside.update(id(m) for m in module.modules())
    return found


def problems(blocks: float, *, family: str, streams: bool, trains_base_weights: bool, gradient_checkpointing: bool,
             compile_mode: str, engine: str | None) -> list[str]:
    """What stops `train.offload: {blocks}` (each with its fix), knowable before any model loads. `streams`: the
    family has a list of transformer blocks (FamilySpec.offload_blocks is not empty); `engine`: the distributed
    engine asked for (FSDP, DEEPSPEED or None)."""
    found = []
    # a NaN fails every comparison; an infinity stops before int(), which cannot take it (YAML reads .nan, .inf)
    if not (0 < blocks < 1 or (1 <= blocks < float("inf") and blocks == int(blocks))):
        found.append(f"train.offload.blocks: a count of blocks (1, 2, ...) or a fraction of them (0.5), got "
                     f"{blocks}; remove train.offload to keep every block on the accelerator")
    if not streams:
        found.append(f"train.offload: {family}'s denoiser is a U-Net, whose blocks differ in width and nest in "
                     "down and up stages: there is no list of transformer blocks to stream; remove train.offload "
                     "(model.quantize and gradient checkpointing save memory there)")
    if trains_base_weights:
        found.append("train.offload: DreamBooth trains the blocks' own weights, and only frozen weights stream "
                     "(the optimizer steps the trained ones on the accelerator); remove train.offload, or train "
                     "a LoRA")
    if not gradient_checkpointing:
        found.append("train.offload: needs train.gradient_checkpointing: true (without recomputation autograd "
                     "keeps every streamed block's weights on the accelerator for the backward pass, so nothing "
                     "would be saved)")
    if compile_mode in ("blocks", "full", "max"):
        found.append(f"train.compile: {compile_mode} cannot go with block offload (train.offload): the compiled "
                     "graphs would guard on the weights the hooks swap in each step and recompile; set "
                     "train.compile: off or auto (auto does not compile with offload)")
    if engine in REFUSED_ENGINES:
        found.append(f"train.offload: {engine} already shards the weights across GPUs, and its own hooks move them; "
                     "remove train.offload, or launch on one GPU")
    return found


class BlockStreamer:
    """Streams the frozen parameters of `blocks` (modules of `denoiser`) to `device`, as the module docstring
    says. On a CPU `device` the copies are real copies (mechanics only: nothing is saved). `trace`: a list the
    hooks append ("copy" | "use" | "release", block position) to, for tests."""

    def __init__(self, denoiser: torch.nn.Module, blocks: list[torch.nn.Module], device: torch.device,
                 trace: list | None = None):
        self.device, self.blocks, self.trace = torch.device(device), blocks, trace
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        pin = self.stream is not None
        self.frozen: list[list[tuple[torch.nn.Module, str]]] = []
        for block in blocks:
            entries = []
            for module in block.modules():
                for name, param in list(module._parameters.items()):
                    if param is None:
                        continue
                    if param.requires_grad:  # LoRA's and other trained weights stay on (or come to) the device
                        if param.device != self.device:
                            param.data = param.data.to(self.device)
                        continue
                    resting = param.detach().to("cpu")
                    module._parameters[name] = torch.nn.Parameter(resting.pin_memory() if pin else resting,
                                                                  requires_grad=False)
                    entries.append((module, name))
            self.frozen.append(entries)
        self.loaded: dict[int, tuple[list[torch.Tensor], Any]] = {}  # copies made, not yet in place
        self.installed: set[int] = set()  # blocks whose device copies are in place
        self.callback_queued = False
        self.bytes = sum(module._parameters[name].numel() * module._parameters[name].element_size()
                         for entries in self.frozen for module, name in entries)
        self.resting = [[module._parameters[name] for module, name in entries] for entries in self.frozen]
        self.handles = [denoiser.register_forward_pre_hook(self._denoiser_starts),
                        denoiser.register_forward_hook(self._denoiser_ends)]
        for position, block in enumerate(blocks):
            self.handles.append(block.register_forward_pre_hook(lambda m, a, p=position: self._use(p)))
            self.handles.append(block.register_forward_hook(lambda m, a, o, p=position: self._release(p)))

    def _note(self, what: str, position: int) -> None:
        if self.trace is not None:
            self.trace.append((what, position))

    def _copy(self, position: int) -> None:
        """Start copying block `position`'s frozen weights to the device (on the side stream), unless under way."""
        if position in self.loaded or not 0 <= position < len(self.blocks):
            return
        self._note("copy", position)
        if self.stream is None:
            self.loaded[position] = ([t.to(self.device, copy=True) for t in self.resting[position]], None)
            return
        with torch.cuda.stream(self.stream):
            copies = [t.to(self.device, non_blocking=True) for t in self.resting[position]]
            done = torch.cuda.Event()
            done.record(self.stream)
        self.loaded[position] = (copies, done)

    def _use(self, position: int) -> None:
        # inside the backward pass (gradient checkpointing's recomputation) blocks run in reverse
        backward = torch._C._current_graph_task_id() != -1
        if backward:
            # the recomputation stops as soon as it has what the backward needs (torch's checkpoint early stop),
            # so no post-hook releases a recomputed block: the next one does (the later block's backward is done
            # by then), and the end of the backward pass the last
            for other in [p for p in self.installed if p != position]:
                self._release(other)
            if not self.callback_queued:
                self.callback_queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._backward_ends)
        self._copy(position)
        copies, done = self.loaded.pop(position)
        if done is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(done)  # the GPU waits for the copy; the host does not
            for tensor in copies:  # their memory is not reused before the compute stream is done with them
                for inner in _storages(tensor):
                    inner.record_stream(compute)
        for (module, name), tensor in zip(self.frozen[position], copies):
            module._parameters[name] = torch.nn.Parameter(tensor, requires_grad=False)
        self.installed.add(position)
        self._note("use", position)
        self._copy(position - 1 if backward else position + 1)

    def _release(self, position: int) -> None:
        if position not in self.installed:
            return
        for (module, name), resting in zip(self.frozen[position], self.resting[position]):
            module._parameters[name] = resting
        self.installed.discard(position)
        self._note("release", position)

    def _backward_ends(self) -> None:
        self.callback_queued = False
        for position in list(self.installed):
            self._release(position)

    def _denoiser_starts(self, module, args) -> None:
        self.loaded.clear()  # a copy left from a forward with no backward may be stale by now
        for position in list(self.installed):
            self._release(position)
        self._copy(0)

    def _denoiser_ends(self, module, args, output) -> None:
        if torch.is_grad_enabled():  # the backward pass recomputes the last block first
            self._copy(len(self.blocks) - 1)

    def remove(self) -> None:
        """Take the hooks away (the frozen weights stay on the CPU)."""
        for handle in self.handles:
            handle.remove()
        self._backward_ends()
        self.loaded.clear()


def _storages(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding `tensor`'s memory: itself, or a torchao wrapper's inner tensors (int8/fp8
    weights: their data and scales)."""
    if type(tensor) in (torch.Tensor, torch.nn.Parameter) or not hasattr(tensor, "__tensor_flatten__"):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    return [inner for name in names for inner in _storages(getattr(tensor, name))]


@dataclass(frozen=True)
class OffloadPlan:
    blocks: list  # the streamed blocks, in the order they run
    total: int  # transformer blocks in the denoiser


def plan(denoiser: torch.nn.Module, spec: Any, options: Any, engine: str, source: str = "<recipe>") -> OffloadPlan:
    """What `train.offload` (`options`, None: off) streams in `denoiser` (an empty plan when off). Raises
    RecipeError (for the recipe at `source`): too many blocks or none found (chosen_blocks), or a sharded
    `engine` (accelerate's distributed type name)."""
    from finetune.recipe.load import RecipeError

    if options is None:
        return OffloadPlan([], 0)
    if engine in REFUSED_ENGINES:
        raise RecipeError(source, problems(options.blocks, family=spec.title, streams=True, trains_base_weights=False,
                                           gradient_checkpointing=True, compile_mode="off", engine=engine))
    try:
        chosen = chosen_blocks(denoiser, spec, options.blocks)
    except ValueError as exc:
        raise RecipeError(source, [str(exc)]) from None
    return OffloadPlan(chosen, len(transformer_blocks(denoiser, block_classes(spec, denoiser))))


def start(denoiser: torch.nn.Module, offload: OffloadPlan, device: torch.device) -> str | None:
    """Stream the planned blocks from now on (after the strategy put its layers in); returns the summary line."""
    if not offload.blocks:
        return None
    return summary_line(BlockStreamer(denoiser, offload.blocks, device), offload.total)


@contextmanager
def held_back(blocks: list[torch.nn.Module]):
    """Within the context the frozen parameters of `blocks` are hidden from their modules, so that moving the
    denoiser to the accelerator leaves them on the CPU (a 12 GB card never holds the whole transformer)."""
    hidden = []
    for block in blocks:
        for module in block.modules():
            for name, param in module._parameters.items():
                if param is not None and not param.requires_grad:
                    hidden.append((module, name, param))
    for module, name, _ in hidden:
        module._parameters[name] = None
    try:
        yield
    finally:
        for module, name, param in hidden:
            module._parameters[name] = param


def chosen_blocks(denoiser: torch.nn.Module, spec: Any, blocks: float) -> list[torch.nn.Module]:
    """The blocks `train.offload.blocks` streams. Raises ValueError naming the count when it asks for more blocks
    than the denoiser has, or when the denoiser has none of the classes looked for."""
    names = block_classes(spec, denoiser)
    every = transformer_blocks(denoiser, names)
    if not every:
        raise ValueError(f"train.offload: found no transformer block ({', '.join(names) or 'none declared'}) in the "
                         f"{type(denoiser).__name__}; remove train.offload")
    count = block_count(blocks, len(every))
    if count > len(every):
        raise ValueError(f"train.offload.blocks: {count}, but the {type(denoiser).__name__} has {len(every)} "
                         f"transformer blocks; ask for at most {len(every)} (or a fraction, e.g. 0.5)")
    return [every[i] for i in spread(len(every), count)]


def summary_line(streamer: BlockStreamer, total: int) -> str:
    where = ("pinned CPU memory, each copied on a side stream ahead of its use" if streamer.stream is not None else
             f"CPU memory, copied to the {streamer.device.type} at each use (mechanics only: nothing is saved here)")
    kinds = sorted({type(b).__name__ for b in streamer.blocks})
    return (f"offload: {len(streamer.blocks)} of {total} transformer blocks ({', '.join(kinds)}) keep their frozen "
            f"weights ({streamer.bytes / 2**30:.2f} GiB) in {where}; trained weights stay on the accelerator")
