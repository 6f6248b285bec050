"""`train.compile`: torch.compile of the denoiser, with the strategy's layers inside it (LoRA and its variants,
the hypernetwork's wrapper, DreamBooth's trained weights; textual inversion's vectors reach it as inputs).

- `blocks`: regional compilation. Each module whose class is one of the family's repeated blocks
  (FamilySpec.compile_blocks, else the denoiser's own `_repeated_blocks`) is compiled in place. Dynamo takes a
  module's parameters as graph inputs, so every copy of a block with the same shapes runs one graph: Flux's 57
  blocks compile two graphs, not 57, in a fraction of `full`'s time and at nearly its speed. This is diffusers'
  `compile_repeated_blocks` (ModelMixin) and torchtitan's per-block compile, and what SimpleTuner, musubi-tuner,
  OneTrainer and ai-toolkit do.
- `full`: the whole denoiser as one graph (plus the pieces between graph breaks).
- `max`: `full` in torch.compile's "max-autotune" mode: autotuned matmul kernels and CUDA graphs, which replay a
  recorded step and so need a CUDA GPU and every batch of one shape (refused otherwise, `problems`).
- `auto`: `blocks` on CUDA, `off` elsewhere (on a CPU compiling takes minutes and gains little) and under FSDP
  or DeepSpeed (not yet measured there).

Compiling happens in place (`Module.compile`), so parameter names, and with them saved files, do not change.
Batches of another size (another bucket) recompile once; from then on dynamo marks the sizes that changed as
dynamic (its automatic dynamic shapes), so buckets do not recompile without end. The U-Net's blocks come in
several widths, each its own graph (parameters keep static shapes), so the recompile limit is raised to
RECOMPILE_LIMIT. Inductor keeps its compiled kernels under the finetune cache (`$FINETUNE_CACHE/inductor`)
unless TORCHINDUCTOR_CACHE_DIR says otherwise, so the second run of a recipe loads them instead of compiling.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from finetune.paths import cache_home

MODES = ("auto", "off", "blocks", "full", "max")
# graphs dynamo keeps per block class before it gives up compiling it: SDXL's ResnetBlock2D alone has about a
# dozen (input width, output width) pairs, and each bucket shape can add a dynamic one
RECOMPILE_LIMIT = 64


def resolve(mode: str, device_type: str, sharded: bool = False) -> str:
    """The mode a run compiles with: `auto` becomes `blocks` on CUDA and `off` elsewhere, and `off` under FSDP or
    DeepSpeed (`sharded`: compiled blocks inside sharded, checkpoint-wrapped ones have not been measured on GPUs
    here; `blocks` asked for by name still compiles); the rest stay."""
    if mode not in MODES:
        raise ValueError(f"train.compile: {mode!r} is not one of {', '.join(MODES)}")
    if mode == "auto":
        return "blocks" if device_type == "cuda" and not sharded else "off"
    return mode


def problems(mode: str, device_type: str, batch_shapes: int) -> list[str]:
    """Why `mode` cannot run here, each with its fix (empty: it can). `batch_shapes`: how many image sizes the
    batches come in (bucket sizes; 1 without buckets)."""
    if mode != "max":
        return []
    found = []
    if device_type != "cuda":
        found.append(f"train.compile: max records CUDA graphs, which need a CUDA GPU (this run is on the "
                     f"{device_type}); use train.compile: blocks or full")
    if batch_shapes > 1:
        found.append(f"train.compile: max replays CUDA graphs recorded for one batch shape, and the batches come in "
                     f"{batch_shapes} bucket sizes; use train.compile: blocks, or train at one size "
                     "(data.bucketing: false)")
    return found


def block_classes(denoiser: torch.nn.Module, declared: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The class names `blocks` compiles: the family's `declared` ones, else the denoiser's `_repeated_blocks`."""
    return tuple(declared or getattr(denoiser, "_repeated_blocks", None) or ())


def compile_denoiser(denoiser: torch.nn.Module, mode: str, declared: tuple[str, ...] = (), *,
                     fullgraph: bool = False, backend: str = "inductor") -> int:
    """Compile `denoiser` in place as `mode` (resolved: off, blocks, full or max) asks; returns how many modules
    were compiled (0 for off). `fullgraph=True` makes a graph break an error (the tests ask for it); `backend`:
    torch.compile's. Raises ValueError when `blocks` finds no block of the classes it looks for."""
    if mode == "off":
        return 0
    use_finetune_cache()
    from finetune.networks.peft_layers import let_dynamo_trace_dora, let_dynamo_trace_lycoris

    # two spots in peft's layers dynamo cannot trace, each answered without changing what the layer computes
    let_dynamo_trace_dora()
    let_dynamo_trace_lycoris(denoiser)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    if mode in ("full", "max"):
        denoiser.compile(fullgraph=fullgraph, backend=backend, mode="max-autotune" if mode == "max" else None)
        return 1
    names = block_classes(denoiser, declared)
    blocks = [module for module in denoiser.modules() if type(module).__name__ in names]
    if not blocks:
        raise ValueError(f"train.compile: blocks found no repeated block ({', '.join(names) or 'none declared'}) "
                         f"in the {type(denoiser).__name__}; use train.compile: full")
    for block in blocks:
        block.compile(fullgraph=fullgraph, backend=backend)
    return len(blocks)


def compile_for_training(denoiser: torch.nn.Module, mode: str, declared: tuple[str, ...] = ()) -> str:
    """compile_denoiser for a run; returns the line saying what was compiled."""
    count = compile_denoiser(denoiser, mode, declared)
    if mode == "off":
        return "compile: off (train.compile: blocks or full compiles the denoiser; auto does on CUDA)"
    what = (f"{count} blocks ({', '.join(block_classes(denoiser, declared))})" if mode == "blocks"
            else "the whole denoiser")
    return f"compile: {mode}, {what}; compiled during the first step (inductor's cache: {inductor_cache()})"


def inductor_cache() -> str:
    return os.environ.get("TORCHINDUCTOR_CACHE_DIR", str(cache_home() / "inductor"))


def use_finetune_cache() -> None:
    """Inductor's cache under the finetune cache folder, unless TORCHINDUCTOR_CACHE_DIR is set."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache()


@dataclass(frozen=True)
class CompileFigures:
    """What dynamo has compiled in this process so far: graphs, graph breaks, seconds spent compiling."""
    graphs: int
    graph_breaks: int
    seconds: float

    @staticmethod
    def now() -> CompileFigures:
        # dynamo's own counters and timers (torch._dynamo.utils); read with defaults, they are not a public API
        from torch._dynamo import utils

        stats = getattr(utils, "counters", {})
        timings = getattr(utils, "compilation_time_metrics", {})
        seconds = sum(sum(timings.get(name, ())) for name in ("_compile.compile_inner", "backward._backward_impl"))
        return CompileFigures(graphs=int(stats.get("stats", {}).get("unique_graphs", 0)),
                              graph_breaks=int(sum(stats.get("graph_break", {}).values())), seconds=seconds)

    def since(self, earlier: CompileFigures) -> CompileFigures:
        return CompileFigures(self.graphs - earlier.graphs, self.graph_breaks - earlier.graph_breaks,
                              self.seconds - earlier.seconds)

    def line(self, when: str) -> str:
        """One line for the run's log, e.g. "compile (first step): 6 graphs in 41.2 s, no graph break"."""
        breaks = "no graph break" if not self.graph_breaks else f"{self.graph_breaks} graph break(s)"
        return f"compile ({when}): {self.graphs} graph(s) in {self.seconds:.1f} s, {breaks}"


class CompileWatch:
    """Says when the steps compiled something: the first step's graphs and compile time, and later recompiles (a
    new batch shape), so a run that recompiles again and again shows it. Reads dynamo's counters only (no device
    work)."""

    def __init__(self) -> None:
        self.start = self.last = CompileFigures.now()

    def news(self, step: int) -> str | None:
        """A line when graphs were compiled since the last call, else None."""
        now = CompileFigures.now()
        new = now.since(self.last)
        if new.graphs <= 0 and new.graph_breaks <= 0:
            return None
        first = self.last == self.start
        self.last = now
        if first:
            return new.line(f"step {step}")
        return (new.line(f"step {step}, a new batch shape") + f"; {now.since(self.start).graphs} graph(s) in all "
                "(sizes that keep changing become dynamic after the second)")
