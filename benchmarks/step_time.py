"""Step time and peak memory of a training recipe against the floor, measured in one run.

The floor is the bare loop a hand-written script cannot beat (benchmarks/floors.py): the denoiser's forward and
backward and AdamW on inputs computed beforehand (latents, text states, and for SDXL the pooled text embedding and
size numbers, for Flux the pooled CLIP-L vector, position ids and guidance), with the same trainable weights (LoRA
of the recipe's rank on the same layers, or the whole denoiser for DreamBooth), precision, batch and resolution.
"Ours" is `finetune train` on the recipe as a user runs it, with its defaults (caches, SDPA, offloading). Each
runs in its own process, so each peak is its own, and the two take turns step by step, so a machine whose speed
drifts (a shared CPU does) cannot favour either.

    python benchmarks/step_time.py --model sd15 --steps 5 --json step_time.json
    python benchmarks/step_time.py --model tiny --recipe my_recipe.yaml
    python benchmarks/step_time.py --model sdxl --steps 9    # bf16 at 512 px unless told otherwise
    python benchmarks/step_time.py --model flux --steps 5    # Flux.1-dev's width, fewer blocks (benchmarks/flux.py)
    python benchmarks/step_time.py --model tiny --compile blocks   # both runs compiled block by block

Peak memory is the process's peak RSS on a CPU and torch's peak allocated memory on a GPU. CPU s/step is the
process's CPU time per step, all threads: the work done, less disturbed than the wall clock by other jobs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.floors import floor_conditioning, transformer_floor, unet_floor  # noqa: E402,F401
from finetune.io.atomic import write_text_atomically  # noqa: E402

DEFAULT_RECIPE = {"strategy": {"kind": "lora", "rank": 4}, "train": {"learning_rate": 1e-4}}


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny",
                        help="tiny, sd15, sdxl or flux (SD1.5, SDXL 1.0 base, Flux.1-dev's width with fewer blocks; "
                             "random weights)")
    parser.add_argument("--recipe", help="a recipe to time (its model and data are replaced); default LoRA rank 4")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (a CPU needs a few to settle)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the recipe's (1)")
    parser.add_argument("--resolution", type=int, default=None,
                        help="default: 512 for sd15, sdxl and flux, 32 for tiny")
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=None,
                        help="default: the recipe's; without --recipe, bf16 for sdxl and flux (fp32 does not fit "
                             "24 GB twice)")
    parser.add_argument("--compile", choices=("auto", "off", "blocks", "full", "max"), default=None,
                        help="train.compile for both runs (the floor compiled the same way, so the ratio stays "
                             "honest); default: the recipe's (auto: blocks on CUDA, off elsewhere)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--child", choices=("floor", "ours"), help=argparse.SUPPRESS)
    parser.add_argument("--child-recipe", help=argparse.SUPPRESS)
    return parser.parse_args()


def _peak_gb(device) -> float:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def _floor(recipe) -> tuple[list[float], float]:
    import torch
    from peft import LoraConfig

    from finetune.models import family_for
    from finetune.networks import peft_layers
    from finetune.training.run import DTYPES

    t = recipe.train
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator().manual_seed(0)
    # the denoiser and a closure giving one step's loss on inputs drawn once: a U-Net (sd, sdxl) or Flux's transformer
    model, loss_of = (transformer_floor if (Path(recipe.model.base) / "transformer").is_dir() else unet_floor)(
        recipe, device, generator)
    model.requires_grad_(False)
    if recipe.strategy.kind == "lora":
        o = recipe.strategy
        targets = o.target_modules or family_for("auto", recipe.model.base).lora_targets  # the same layers as ours
        peft_layers.inject(model, LoraConfig(r=o.rank, lora_alpha=o.alpha or o.rank, init_lora_weights="gaussian",
                                             target_modules=list(targets)))
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
    elif recipe.strategy.kind == "dreambooth":
        model.float().requires_grad_(True)
        params = list(model.parameters())
    else:
        raise SystemExit(f"no floor defined for strategy {recipe.strategy.kind!r} (lora and dreambooth have one)")
    if t.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.to(device).train()
    # compiled as the run compiles its denoiser (training/compile.py), the LoRA layers inside
    from finetune.training.compile import compile_denoiser, resolve

    blocks = family_for("auto", recipe.model.base).spec.compile_blocks
    compile_denoiser(model, resolve(t.compile, device.type), blocks)
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                                  weight_decay=t.adam_weight_decay, eps=t.adam_epsilon)
    autocast = torch.autocast(device.type, dtype=DTYPES.get(t.mixed_precision, torch.float32),
                              enabled=t.mixed_precision != "no")
    times, cpu = [], []
    # the attention kernels the run gets (train.attention: auto), not PyTorch's bare choice
    from finetune.training.attention import kernels_for, sdpa_kernels

    kernels = kernels_for("auto", device, half_precision=t.mixed_precision != "no")[0]
    _ready()
    with sdpa_kernels(kernels):
        for _ in range(t.max_steps - 1):  # the toolkit's first step runs untimed, during its set-up
            _wait_for_turn()
            start, cpu_start = time.perf_counter(), time.process_time()
            with autocast:
                loss = loss_of()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()  # the step done on the device before the other run takes its turn (ours waits likewise)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - cpu_start)
            _report(times[-1])
    return times, cpu, _peak_gb(device)


def _ours(recipe) -> tuple[list[float], float]:
    import torch

    from finetune.training.loop import train

    times, cpu, started = [], [], []

    def on_step(step: int) -> None:
        # the loop reads nothing from the device between log points; the two runs take turns on one GPU, so each
        # step ends when the device has done it (the floor's loss.item() does the same)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if step == 1:
            _ready()  # set-up and the first step are done
        else:
            times.append(time.perf_counter() - started[-1][0])
            cpu.append(time.process_time() - started[-1][1])
            _report(times[-1])
        if step < recipe.train.max_steps:
            _wait_for_turn()
            started.append((time.perf_counter(), time.process_time()))

    train(recipe, on_step=on_step)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return times, cpu, _peak_gb(device)


# The two runs live in two processes (so each peak is its own) and take turns, one step at a time, under the
# parent's control: both meet the same machine, and a machine that slows down mid-run slows both alike.
def _ready() -> None:
    print("READY", flush=True)


def _wait_for_turn() -> None:
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("the benchmark's parent went away")


def _report(seconds: float) -> None:
    print(f"STEP {seconds}", flush=True)


def _child(kind: str, recipe_path: str) -> None:
    from finetune.recipe.load import load_recipe

    recipe = load_recipe(recipe_path, [])
    times, cpu, peak = (_floor if kind == "floor" else _ours)(recipe)
    print("RESULT " + json.dumps({"times": times, "cpu_times": cpu, "peak_gb": peak}), flush=True)


def _start_child(kind: str, recipe_path: Path) -> subprocess.Popen:
    command = [sys.executable, __file__, "--child", kind, "--child-recipe", str(recipe_path)]
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)


def _read_until(child: subprocess.Popen, kind: str, word: str) -> str:
    for line in child.stdout:
        if line.startswith(word):
            return line[len(word):].strip()
    raise SystemExit(f"the {kind} run ended early (exit {child.wait()}); its messages are above")


def _take_turns(recipe_path: Path, steps: int) -> dict:
    children = {kind: _start_child(kind, recipe_path) for kind in ("floor", "ours")}
    try:
        for kind, child in children.items():
            _read_until(child, kind, "READY")
        for _ in range(steps):
            for kind, child in children.items():
                child.stdin.write("go\n")
                child.stdin.flush()
                _read_until(child, kind, "STEP ")
        results = {kind: json.loads(_read_until(child, kind, "RESULT ")) for kind, child in children.items()}
    finally:
        for child in children.values():
            child.stdin.close()
            child.wait()
    return results


def _recipe(args, work: Path) -> Path:
    import yaml

    from benchmarks.models import DEFAULT_MIXED_PRECISION, DEFAULT_RESOLUTION, data_folder, model_folder

    data = yaml.safe_load(Path(args.recipe).read_text()) if args.recipe else json.loads(json.dumps(DEFAULT_RECIPE))
    resolution = args.resolution or DEFAULT_RESOLUTION[args.model]
    data["model"] = {**data.get("model", {}), "base": str(model_folder(args.model))}
    data["data"] = {**data.get("data", {}), "images": str(data_folder(resolution)), "resolution": resolution}
    data["data"].pop("dataset", None)
    data["train"] = {**data.get("train", {}), "max_steps": 1 + args.warmup + args.steps}
    if args.batch_size:
        data["train"]["batch_size"] = args.batch_size
    if args.compile:
        data["train"]["compile"] = args.compile
    precision = args.mixed_precision or (None if args.recipe else DEFAULT_MIXED_PRECISION.get(args.model))
    if precision:
        data["train"]["mixed_precision"] = precision
    data["output_dir"] = str(work / "out")
    data["checkpoint"] = {"every": 0}
    data["sample"] = {"every": 0}
    data["log"] = {"to": []}
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def main() -> None:
    args = _arguments()
    if args.child:
        _child(args.child, args.child_recipe)
        return
    if args.steps < 1 or args.warmup < 1:
        raise SystemExit("--steps and --warmup must be at least 1 (the first step is never timed)")
    with tempfile.TemporaryDirectory(prefix="finetune-bench-") as work:
        recipe_path = _recipe(args, Path(work))
        from finetune.recipe.load import load_recipe

        recipe = load_recipe(str(recipe_path), [])
        runs = _take_turns(recipe_path, args.warmup + args.steps)
    import torch

    batch = recipe.train.batch_size
    figures = {"model": args.model, "strategy": recipe.strategy.kind, "resolution": recipe.data.resolution,
               "batch_size": batch, "mixed_precision": recipe.train.mixed_precision, "steps": args.steps,
               "compile": recipe.train.compile,
               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    for kind, run in runs.items():
        timed = run["times"][-args.steps:]
        figures[f"{kind}_s_per_step"] = statistics.median(timed)
        figures[f"{kind}_samples_per_s"] = batch / figures[f"{kind}_s_per_step"]
        figures[f"{kind}_peak_gb"] = run["peak_gb"]
        figures[f"{kind}_step_times"] = timed
        # the process's CPU seconds per step (all its threads): the work done, which other jobs on a shared machine
        # slow down less than the wall clock
        figures[f"{kind}_cpu_s_per_step"] = statistics.median(run["cpu_times"][-args.steps:])
    figures["ratio"] = figures["ours_s_per_step"] / figures["floor_s_per_step"]
    figures["cpu_ratio"] = figures["ours_cpu_s_per_step"] / figures["floor_cpu_s_per_step"]
    figures["memory_ratio"] = figures["ours_peak_gb"] / figures["floor_peak_gb"]
    print(f"\n{args.model}, {figures['strategy']}, {figures['resolution']} px, batch {batch}, "
          f"{figures['mixed_precision']}, compile {figures['compile']}, {figures['device']}, median of "
          f"{args.steps} steps")
    print(f"{'':10} {'s/step':>9} {'samples/s':>10} {'peak GB':>9} {'CPU s/step':>11}")
    for kind, label in (("floor", "floor"), ("ours", "finetune")):
        print(f"{label:10} {figures[f'{kind}_s_per_step']:9.3f} {figures[f'{kind}_samples_per_s']:10.3f} "
              f"{figures[f'{kind}_peak_gb']:9.2f} {figures[f'{kind}_cpu_s_per_step']:11.3f}")
    print(f"{'ratio':10} {figures['ratio']:9.3f} {'':10} {figures['memory_ratio']:9.3f} {figures['cpu_ratio']:11.3f}")
    if args.json:
        print(f"wrote {write_text_atomically(args.json, json.dumps(figures, indent=2))}")


if __name__ == "__main__":
    main()
