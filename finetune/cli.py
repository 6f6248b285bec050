"""Command line: `finetune train|validate|sample|env ...` (also `python -m finetune ...`)."""
from __future__ import annotations

import os
import sys

# OpenMP threads that spin while waiting make a CPU run 5-10x slower whenever another process wants a core;
# this must be set before torch loads
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

EXIT_BAD_INPUT = 2
EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a tool that SIGPIPE stopped


def main(argv: list[str] | None = None) -> int:
    from finetune import console
    from finetune.cli_arguments import parser

    args = parser().parse_args(argv)
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

    if args.keys is not None:
        extra = [word for word in [args.recipe, *args.overrides] if word is not None] + ["--decode"] * args.decode
        if extra:  # the reference alone would print, and the recipe seem checked
            raise KnownProblem(f"finetune validate --keys writes the recipe reference and reads no recipe: leave out "
                               f"{' '.join(extra)}, or check the recipe with finetune validate RECIPE.yaml (no --keys)")
        return _write_keys(args.keys)
    if args.recipe is None:
        raise KnownProblem("finetune validate: name a recipe (finetune validate recipe.yaml), or ask for the "
                           "recipe reference with --keys")
    try:
        lines = validate(args.recipe, args.overrides, decode=args.decode)
    except _known_errors() as exc:
        raise KnownProblem(str(exc)) from None
    print("\n".join(lines))
    return 0


def _write_keys(destination: str) -> int:
    """`finetune validate --keys [FILE]`: the recipe reference, printed ("-") or written to FILE."""
    from finetune.recipe.reference import ReferenceRefused, write_reference

    try:
        print(write_reference(destination), end="")
    except ReferenceRefused as exc:
        raise KnownProblem(f"finetune validate --keys: {exc}") from None
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
    from finetune.training.control_images import count_problems, with_given_controls
    from finetune.training.sample_prompts import PromptProblem, prompt_entries
    from finetune.training.sampling import draw_grid, save_png
    from functools import partial
    from pathlib import Path

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if bool(args.prompt) == bool(args.prompt_file):
        raise KnownProblem("give --prompt (once per row) or --prompt-file, one of the two")
    try:
        entries, notes = prompt_entries(args.prompt or [], args.prompt_file)  # a bad file fails before the base loads
        for note in notes:
            print(f"note: {note}")
        entries = with_given_controls(entries, args.control, "--control")
        if args.adapter:
            check_adapter_file(args.adapter)  # a file cut short fails here, before the base loads
        _check_writable(Path(args.out).parent, "--out")
        family = family_for("auto", args.base, hub=True)
        too_many = count_problems(entries, family)
        if too_many:
            raise KnownProblem("\n".join(too_many).replace("control_image:", "--control / control_image:"))
        parts = family.load(args.base, dtype=torch.float16 if device == "cuda" else torch.float32)
        pipe = family.pipeline(parts).to(device)
        if args.adapter:
            load_adapter(pipe, args.adapter, scale=args.scale)
        parts.max_token_length = args.max_token_length or (trained_max_token_length(args.adapter)
                                                           if args.adapter else None)
    except (*_known_errors(), ValueError) as exc:  # PromptProblem is a ValueError
        raise KnownProblem(str(exc).replace("sample.prompt_file", "--prompt-file")) from None
    from finetune.models.base import default_guidance, default_resolution

    # an adapter draws best at the size it learned; --resolution wins, the model's own size where the file is silent
    trained = trained_resolution(args.adapter) if args.adapter and not args.resolution else None
    if trained:
        print(f"drawing at {trained} px, the resolution the adapter was trained at (--resolution to change)")
    resolution = args.resolution or trained or default_resolution(pipe)
    guidance = args.guidance if args.guidance is not None else default_guidance(pipe)
    try:
        rows = _prompt_rows(entries, args, guidance, resolution, pipe)
    except PromptProblem as exc:
        raise KnownProblem(str(exc)) from None
    grid = draw_grid(pipe, rows, args.num,
                     encode=partial(family.encode_prompts, parts) if parts.max_token_length else None,
                     control=family.sample_kwargs)
    print(f"wrote {save_png(grid, Path(args.out))}")
    return 0


def _prompt_rows(entries: list[dict], args, guidance: float, resolution: int, pipe) -> list:
    """`finetune sample`'s rows: --prompt-file's entries (or the --prompt strings) with the command's options as
    defaults, sizes checked against the loaded VAE's downsampling. Raises PromptProblem."""
    from finetune.models.pipeline_folder import downsampling_of
    from finetune.training.sample_prompts import Defaults, PromptProblem, resolve, size_problems

    rows = resolve(entries, Defaults(negative_prompt=args.negative_prompt, seed=args.seed, steps=args.steps,
                                     guidance=guidance, width=resolution, height=resolution))
    vae = getattr(pipe, "vae", None)
    factor = (downsampling_of(vae.config) if vae is not None else None) or 8
    problems = size_problems(rows, entries, factor, f"this base's VAE downsamples by {factor}")
    if problems:
        raise PromptProblem("\n".join(problems))
    return rows


def _check_writable(folder, option: str) -> None:
    """Before any model loads: KnownProblem when the folder `option` writes in cannot be written."""
    from finetune.file_errors import unwritable_folder

    blocked = unwritable_folder(folder)
    if blocked is not None:
        raise KnownProblem(f"{option}: {blocked} cannot be written (a read-only disk, or no permission); choose a "
                           "folder you can write to")


def _eval(args) -> int:
    import json

    from finetune.io.atomic import write_text_atomically
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
            from finetune.demo.page import write_demo_page

            print(f"wrote {write_demo_page(folder)}")
        else:
            from finetune.report.page import write_report

            print(f"wrote {write_report(folder)}")
    except NotARunFolder as exc:
        raise KnownProblem(str(exc)) from None
    return 0


def _demo(args) -> int:
    from finetune.demo.run import run_demo

    strategies = [s.strip() for s in args.strategies.split(",")] if args.strategies else None
    try:
        from finetune.demo.run import BASES

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
