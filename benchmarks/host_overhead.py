"""Host work per training step, eager against compiled, on each family's tiny model on the CPU.

Two figures per step of `finetune train` (LoRA rank 4, 32 px, batch 1, fp32): the process's CPU seconds, and the
aten operators it dispatches from Python or from compiled code (each a trip into the dispatcher and, on a GPU, at
least one kernel launch the host must issue in turn). Compiling fuses a block's dozens of operators into a few
kernels that inductor calls directly, so the count is what a GPU step would wait on the host for. The operators
are counted by torch.profiler in one more step after the timed ones: a TorchDispatchMode, the obvious counter,
turns compiled code off while it is active (dynamo runs eagerly under one), so it would count eager's operators
for every mode. The first steps are not measured (the first compiles). Issue 35's target: `blocks` dispatches at most a quarter of
eager's operators per step, with no graph break, and less CPU time.

    python benchmarks/host_overhead.py                         # every family, off and blocks
    python benchmarks/host_overhead.py --family sd flux --modes off blocks full --json host.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from finetune.io.atomic import write_text_atomically  # noqa: E402


def top_level_operators(profile) -> int:
    """aten operators the host called itself (not those an operator calls inside it)."""
    return sum(1 for event in profile.events() if event.name.startswith("aten::")
               and not (event.cpu_parent is not None and event.cpu_parent.name.startswith("aten::")))


def measure(family: str, mode: str, steps: int, warmup: int, work: Path) -> dict:
    """CPU seconds and operators per step (medians over `steps` after `warmup`), graphs and graph breaks."""
    from finetune.models.tiny import save_tiny_pipeline
    from finetune.recipe.load import parse_recipe
    from finetune.training.compile import CompileFigures
    from finetune.training.loop import train

    from benchmarks.models import data_folder

    base = work / f"{family}-base"
    if not base.exists():
        save_tiny_pipeline(base, family=family)
    recipe = parse_recipe({
        "model": {"base": str(base)}, "strategy": {"kind": "lora", "rank": 4},
        "data": {"images": str(data_folder(32)), "resolution": 32},
        "train": {"max_steps": warmup + steps + 2, "compile": mode, "learning_rate": 1e-4},
        "checkpoint": {"every": 0}, "log": {"to": [], "every": warmup + steps + 2},
        "output_dir": str(work / f"{family}-{mode}")})
    cpu, operators, last = [], [], {}
    before = CompileFigures.now()
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])

    def on_step(step: int) -> None:
        if warmup + 1 < step <= warmup + steps + 1:  # a timed step ended
            cpu.append(time.process_time() - last["cpu"])
        if step == warmup + steps + 2:  # the profiled one ended
            profiler.__exit__(None, None, None)
            operators.append(top_level_operators(profiler))
        if warmup < step <= warmup + steps:  # the next one is timed
            last["cpu"] = time.process_time()
        elif step == warmup + steps + 1:
            profiler.__enter__()

    train(recipe, on_step=on_step, overwrite=True)
    compiled = CompileFigures.now().since(before)
    torch._dynamo.reset()
    return {"cpu_s_per_step": statistics.median(cpu), "operators_per_step": operators[0],
            "graphs": compiled.graphs, "graph_breaks": compiled.graph_breaks,
            "compile_s": round(compiled.seconds, 2)}


def main() -> None:
    from finetune.models import specs
    from finetune.recipe.checks import missing_modules

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", nargs="*", default=None, help="default: every family")
    parser.add_argument("--modes", nargs="*", default=["off", "blocks"], help="train.compile modes to compare")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2, help="steps before the measured ones (the first compiles)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    figures = {}
    with tempfile.TemporaryDirectory(prefix="finetune-host-") as work:
        for family in args.family or sorted(specs()):
            missing = missing_modules(specs()[family])
            if missing:
                print(f"{family}: skipped ({'; '.join(missing)})", flush=True)
                continue
            figures[family] = {mode: measure(family, mode, args.steps, args.warmup, Path(work)) for mode in args.modes}
            eager = figures[family][args.modes[0]]
            for mode, got in figures[family].items():
                share = got["operators_per_step"] / eager["operators_per_step"]
                print(f"{family:16} {mode:7} CPU {got['cpu_s_per_step'] * 1000:8.1f} ms/step  "
                      f"{got['operators_per_step']:6.0f} operators/step ({share:.2f}x)  {got['graphs']} graph(s), "
                      f"{got['graph_breaks']} break(s), compiled in {got['compile_s']} s", flush=True)
    if args.json:
        print(f"wrote {write_text_atomically(args.json, json.dumps(figures, indent=2))}")


if __name__ == "__main__":
    main()
