"""Command line: `finetune train|validate|sample|env ...` (also `python -m finetune ...`)."""
from __future__ import annotations

import argparse
import os
import sys

# OpenMP threads that spin while waiting make a CPU run 5-10x slower whenever another process wants a core;
# this must be set before torch loads
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

EXIT_BAD_INPUT = 2
EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a tool that SIGPIPE stopped


def _parser() -> argparse.ArgumentParser:
    from finetune import __version__

    parser = argparse.ArgumentParser(prog="finetune", description=__doc__)
    parser.add_argument("--version", action="version", version=f"finetune {__version__}")
    # every command takes them after its name (the tools in tools/commands.py too, through add_parser)
    talk = argparse.ArgumentParser(add_help=False)
    talk.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors, no progress bars")
    talk.add_argument("-v", "--verbose", action="store_true",
                      help="everything, the libraries' own information and warnings included")
    commands = parser.add_subparsers(dest="command", required=True)
    add_parser = commands.add_parser
    commands.add_parser = lambda *args, **kwargs: add_parser(*args, parents=[talk], **kwargs)

    train = commands.add_parser("train", help="train with a recipe")
    train.add_argument("recipe", help="YAML recipe")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.max_steps=100")
    train.add_argument("--resume", metavar="latest|PATH",
                       help="continue from the newest checkpoint in output_dir, or from a checkpoint folder")
    train.add_argument("--overwrite", action="store_true",
                       help="start anew in an output_dir that holds a finished run or checkpoints (refused without "
                            "it): the earlier checkpoints are removed, the artifact replaced when this run saves")

    validate = commands.add_parser("validate", help="check a recipe and its data without loading any model")
    validate.add_argument("recipe")
    validate.add_argument("overrides", nargs="*", metavar="key=value")
    validate.add_argument("--decode", action="store_true",
                          help="decode every image as training does (slower); by default their headers are read")

    sample = commands.add_parser("sample", help="generate a grid with a base model and an optional adapter")
    sample.add_argument("--base", required=True, help="hub id, diffusers folder or single checkpoint file")
    sample.add_argument("--adapter", help="artifact written by `finetune train`")
    sample.add_argument("--prompt", required=True, action="append", help="repeat for several rows")
    sample.add_argument("--scale", type=float, default=1.0, help="adapter strength (0: the base alone)")
    sample.add_argument("--out", required=True, help="PNG file to write")
    sample.add_argument("--negative-prompt", default="")
    sample.add_argument("--steps", type=int, default=25)
    sample.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance (Flux.1-dev: its embedded guidance); default: the pipeline's "
                             "own (SD 7.5, SDXL 5, SD3 7, Flux.1-dev 3.5)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--num", type=int, default=4, help="images per prompt")
    sample.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the "
                        "resolution the adapter was trained at, from its header; else the model's own)")
    sample.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    sample.add_argument("--max-token-length", type=int, choices=(75, 150, 225), default=None,
                        help="encode long prompts in 75-token chunks as training did (default: what the adapter "
                             "was trained with, from its header)")
    evaluate = commands.add_parser("eval", help="shapes world: judge a base (and an adapter) on a concept")
    evaluate.add_argument("--base", default=None, help="a shipped shapes-world base (unet, transformer) or a "
                          "pipeline folder; default: unet")
    evaluate.add_argument("--adapter", help="adapter file, or tuned pipeline folder (DreamBooth), to judge; "
                          "without it the bare base is judged")
    evaluate.add_argument("--concept", required=True, help="new_object or known_look")
    evaluate.add_argument("--json", help="also write the metrics to this JSON file")

    demo = commands.add_parser("demo", help="shapes world: teach each strategy its concept, on a CPU")
    demo.add_argument("--out", default="demo_output", help="folder for the report, grids and runs")
    demo.add_argument("--strategies", default=None, help="comma-separated, e.g. lora (default: all)")
    demo.add_argument("--quick", action="store_true",
                      help="a quick look: LoRA teaching the star only, on each chosen base")
    demo.add_argument("--full", action="store_true", help="every strategy on both concepts, and DreamBooth without "
                      "the prior (default: each strategy on the concept its targets judge)")
    demo.add_argument("--base", default="all", choices=("unet", "transformer", "all"),
                      help="the shipped base(s) to teach: the U-Net (tiny SD 1.x) or the transformer (tiny SD3, flow "
                           "matching); default all")
    demo.add_argument("--max-steps", type=int, default=None,
                      help="override every run's train.max_steps (a quick look; the targets need the defaults)")
    demo.add_argument("--seeds", type=int, default=1,
                      help="run every recipe with train.seed 0..N-1; report mean and minimum, judge the targets on "
                           "the worst seed (default 1)")

    report = commands.add_parser("report", help="rebuild a run's report.html (or a demo's demo_report.html) from "
                                                "what its folder holds")
    report.add_argument("output_dir", metavar="OUTPUT_DIR", help="a run's output_dir, or a demo's --out folder")

    extract = commands.add_parser("extract-lora",
                                  help="turn a DreamBooth pipeline folder into a LoRA file (SVD of tuned - base)")
    extract.add_argument("--tuned", required=True, help="the tuned pipeline folder (output_dir/pipeline)")
    extract.add_argument("--base", required=True, help="the base it was tuned from (hub id, folder or file)")
    extract.add_argument("--rank", type=int, default=32, help="rank kept per layer (default 32)")
    extract.add_argument("--out", required=True, help=".safetensors file to write")
    extract.add_argument("--device", default="cpu", help="where the SVDs run, e.g. cuda (default cpu)")
    extract.add_argument("--save-dtype", choices=("fp32", "fp16", "bf16"), default="fp16",
                         help="dtype of the written weights (default fp16)")
    commands.add_parser("env", help="print what a bug report needs: versions, platform, accelerator, problems")
    from finetune.tools.commands import add_parsers

    add_parsers(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    from finetune import console

    args = _parser().parse_args(argv)
    if args.quiet and args.verbose:
        print("error: --quiet and --verbose contradict each other; give one", file=sys.stderr)
        return EXIT_BAD_INPUT
    console.configure(console.QUIET if args.quiet else console.VERBOSE if args.verbose else console.NORMAL)
    from finetune.file_errors import FileProblem

    try:
        if args.command == "env":  # no package check first: it reports the packages that do not fit
            code = _env()
            sys.stdout.flush()
            return code
        # before any model loads: packages known not to work together stop here, not in a traceback later
        check_packages()
        commands = {"train": _train, "validate": _validate, "sample": _sample, "eval": _eval, "demo": _demo,
                    "extract-lora": _extract_lora, "report": _report}
        code = commands[args.command](args) if args.command in commands else _file_tool(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush after main returns
        return code
    except (KnownProblem, FileProblem) as exc:  # FileProblem: a file any command failed to read or write
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:
        # the reader stopped early (`finetune inspect FILE | head`): stop quietly, as Unix tools do; what is
        # still buffered goes nowhere, so Python's own flush at exit cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except Exception as exc:  # a full or read-only disk met by a write no writer above named: still no traceback
        from finetune.file_errors import unnamed_write_problem

        problem = unnamed_write_problem(exc)
        if problem is None:
            raise
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT


def command_line() -> None:
    """The `finetune` executable and `python -m finetune`: main(), then exit without the interpreter's final
    garbage collections, which walk every object torch, transformers and diffusers made at import (3 to 4 s of a
    loaded 2-core CPU after a run had stopped or finished; 0.3 s without). Every file is written and closed
    by then; the objects are left to the OS, as at any process exit. Not in main(): tests and scripts call it
    many times in one process, where frozen objects would never be collected."""
    import gc

    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    gc.freeze()  # the finalizing collections skip frozen objects
    raise SystemExit(code)


class KnownProblem(Exception):
    pass


def check_packages() -> None:
    from finetune.environment import IncompatiblePackages, check_packages as check

    try:
        check()
    except IncompatiblePackages as exc:
        raise KnownProblem(str(exc)) from None


def _env() -> int:
    from finetune.environment import report

    rows = report()
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name + ':':<{width + 1}} {value}")
    return 0


def _known_errors() -> tuple[type[Exception], ...]:
    from finetune.data import DataError
    from finetune.models import ModelLoadError
    from finetune.models.detect import UnsupportedFamily
    from finetune.recipe.load import RecipeError
    from finetune.strategies.base import StrategySetupError
    from finetune.training.checkpoint import CheckpointError
    from finetune.file_errors import FileProblem
    from finetune.training.failures import SaveFailed, TrainingDiverged

    return (RecipeError, DataError, ModelLoadError, CheckpointError, StrategySetupError, TrainingDiverged, SaveFailed,
            UnsupportedFamily, FileProblem)


def _validate(args) -> int:
    from finetune.tools.validate import validate

    try:
        lines = validate(args.recipe, args.overrides, decode=args.decode)
    except _known_errors() as exc:
        raise KnownProblem(str(exc)) from None
    print("\n".join(lines))
    return 0


def _train(args) -> int:
    from finetune.recipe.load import load_recipe
    from finetune.training.interrupt import Interrupted
    from finetune.training.loop import train

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        train(recipe, resume=args.resume, overwrite=args.overwrite)
    except _known_errors() as exc:
        raise KnownProblem(str(exc)) from None
    except Interrupted as exc:
        print(str(exc), file=sys.stderr)
        return exc.exit_code
    return 0


def _sample(args) -> int:
    import torch

    from finetune.adapters import check_adapter_file, load_adapter, trained_max_token_length, trained_resolution
    from finetune.models import family_for
    from finetune.training.sampling import sample_grid, save_png
    from functools import partial
    from pathlib import Path

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if args.adapter:
            check_adapter_file(args.adapter)  # a file cut short fails here, before the base loads
        _check_writable(Path(args.out).parent, "--out")
        family = family_for("auto", args.base, hub=True)
        parts = family.load(args.base, dtype=torch.float16 if device == "cuda" else torch.float32)
        pipe = family.pipeline(parts).to(device)
        if args.adapter:
            load_adapter(pipe, args.adapter, scale=args.scale)
        parts.max_token_length = args.max_token_length or (trained_max_token_length(args.adapter)
                                                           if args.adapter else None)
    except (*_known_errors(), ValueError) as exc:
        raise KnownProblem(str(exc)) from None
    from finetune.models.base import default_guidance, default_resolution

    # an adapter draws best at the size it learned; --resolution wins, the model's own size where the file is silent
    trained = trained_resolution(args.adapter) if args.adapter and not args.resolution else None
    if trained:
        print(f"drawing at {trained} px, the resolution the adapter was trained at (--resolution to change)")
    resolution = args.resolution or trained or default_resolution(pipe)
    guidance = args.guidance if args.guidance is not None else default_guidance(pipe)
    grid = sample_grid(pipe, args.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
                       guidance_scale=guidance, seed=args.seed, images_per_prompt=args.num,
                       resolution=resolution,
                       encode=partial(family.encode_prompts, parts) if parts.max_token_length else None)
    print(f"wrote {save_png(grid, Path(args.out))}")
    return 0


def _check_writable(folder, option: str) -> None:
    """Before any model loads: KnownProblem when the folder `option` writes in cannot be written."""
    from finetune.file_errors import unwritable_folder

    blocked = unwritable_folder(folder)
    if blocked is not None:
        raise KnownProblem(f"{option}: {blocked} cannot be written (a read-only disk, or no permission); choose a "
                           "folder you can write to")


def _eval(args) -> int:
    import json

    from finetune.paths import write_text_atomically
    from finetune.shapes.evaluate import evaluate

    try:
        numbers = evaluate(args.base, args.adapter, args.concept)
    except (KeyError, FileNotFoundError, ValueError, *_known_errors()) as exc:
        raise KnownProblem(str(exc).strip("'\"")) from None
    for key, value in numbers.items():
        print(f"{key}: {value}")
    if args.json:
        write_text_atomically(args.json, json.dumps(numbers, indent=2))
    if args.adapter:
        from finetune.report.evaluations import save_evaluation

        saved = save_evaluation(args.adapter, args.concept, numbers, by="finetune eval")
        print(f"figures: {saved[0]} (shown in {saved[1]})" if saved else
              f"figures: not kept beside the adapter ({args.adapter} is in no run's output_dir)")
    return 0


def _report(args) -> int:
    from pathlib import Path

    from finetune.report.sources import NotARunFolder

    folder = Path(args.output_dir)
    try:
        if (folder / "demo_report.json").is_file():
            from finetune.report.demo_page import write_demo_page

            print(f"wrote {write_demo_page(folder)}")
        else:
            from finetune.report.page import write_report

            print(f"wrote {write_report(folder)}")
    except NotARunFolder as exc:
        raise KnownProblem(str(exc)) from None
    return 0


def _demo(args) -> int:
    from finetune.shapes.demo import run_demo

    strategies = [s.strip() for s in args.strategies.split(",")] if args.strategies else None
    try:
        from finetune.shapes.demo import BASES

        bases = BASES if args.base == "all" else (args.base,)
        report = run_demo(args.out, strategies, max_steps=args.max_steps, quick=args.quick, seeds=args.seeds,
                          bases=bases, full=args.full)
    except (ValueError, FileNotFoundError, *_known_errors()) as exc:
        raise KnownProblem(str(exc)) from None
    print(f"wrote {args.out}/demo_report.md, demo_report.json and demo_report.html ({len(report['runs'])} runs)")
    return 0


def _extract_lora(args) -> int:
    import torch

    from finetune.export.extract_lora import extract_lora

    if not args.out.endswith(".safetensors"):
        raise KnownProblem(f"--out: {args.out} should end in .safetensors")
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    try:
        path, results = extract_lora(args.tuned, args.base, args.rank, args.out, device=args.device,
                                     save_dtype=dtypes[args.save_dtype])
    except (ValueError, *_known_errors()) as exc:
        raise KnownProblem(str(exc)) from None
    for component, result in results.items():
        print(f"{component}: {len(result.ranks)} layers at rank <= {args.rank}")
        if result.not_carried:
            print(f"  not carried by LoRA ({len(result.not_carried)} changed parameters, e.g. norms): "
                  f"{', '.join(result.not_carried[:3])}{', ...' if len(result.not_carried) > 3 else ''}")
    print(f"wrote {path}")
    return 0


def _file_tool(args) -> int:
    """convert | merge | resize | inspect: a file or base the tool cannot use is bad input (exit 2)."""
    from finetune.tools.commands import HANDLERS

    try:
        return HANDLERS[args.command](args)
    except (ValueError, FileNotFoundError, *_known_errors()) as exc:
        raise KnownProblem(str(exc)) from None
