"""The command-line side of the file tools: `finetune convert | merge | resize | inspect`."""
from __future__ import annotations

import argparse
import json


def add_parsers(commands: argparse._SubParsersAction) -> None:
    convert = commands.add_parser("convert", help="convert a LoRA or embedding between diffusers and kohya formats")
    convert.add_argument("source", metavar="IN", help="LoRA or embedding file (.safetensors, or an A1111 .pt)")
    convert.add_argument("out", metavar="OUT", help=".safetensors file to write")
    convert.add_argument("--to", required=True, choices=("diffusers", "kohya", "comfyui"))
    convert.add_argument("--base", help="base model (hub id, folder or file): match kohya names against its "
                         "modules instead of parsing them")
    convert.add_argument("--token", help="embeddings: the token to write (diffusers) or to pick (kohya)")

    merge = commands.add_parser("merge", help="fuse LoRAs (or other adapters) into the base at given ratios")
    merge.add_argument("--base", required=True, help="hub id, diffusers folder or single checkpoint file")
    merge.add_argument("--lora", required=True, action="append", metavar="FILE[:RATIO]",
                       help="adapter file and its ratio (default 1); repeat for several")
    merge.add_argument("--out", required=True, help="a folder (diffusers pipeline) or FILE.safetensors "
                       "(one original-layout checkpoint, as AUTOMATIC1111 loads)")
    merge.add_argument("--save-dtype", choices=("fp32", "fp16", "bf16"), default="fp16",
                       help="dtype of the written weights (default fp16)")

    resize = commands.add_parser("resize", help="re-rank a LoRA by SVD, to a rank or a kept-energy fraction")
    resize.add_argument("source", metavar="IN", help="LoRA file (diffusers or kohya format)")
    resize.add_argument("out", metavar="OUT", help=".safetensors file to write (same format as IN)")
    resize.add_argument("--rank", type=int, help="rank to keep per layer (at most)")
    resize.add_argument("--energy", type=float, help="fraction of each layer's energy to keep, e.g. 0.9")
    resize.add_argument("--json", help="also write the per-layer ranks and energy kept to this JSON file")
    resize.add_argument("--base", help="the base model, to match a kohya file's names against its modules "
                                       "(default: parse them; SDXL names follow the released SDXL)")

    inspect = commands.add_parser("inspect", help="what a model or adapter file is, its base, metadata and shapes")
    inspect.add_argument("file", help="a .safetensors / .pt / .ckpt file or a diffusers pipeline folder")
    inspect.add_argument("--all", action="store_true", help="every shape and full metadata values")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")


def run_convert(args) -> int:
    from finetune.tools.convert import convert

    print(convert(args.source, args.out, args.to, base=args.base, token=args.token))
    return 0


def run_merge(args) -> int:
    from finetune.tools.merge import merge, parse_adapter_argument

    lines = merge(args.base, [parse_adapter_argument(text) for text in args.lora], args.out, args.save_dtype)
    print("\n".join(lines + [f"wrote {args.out}"]))
    return 0


def run_resize(args) -> int:
    from dataclasses import asdict

    from finetune.io.atomic import write_text_atomically
    from finetune.tools.resize import resize_file, summary

    if not args.out.endswith(".safetensors"):
        raise ValueError(f"{args.out}: the output should end in .safetensors")
    path, reports = resize_file(args.source, args.out, args.rank, args.energy, args.base)
    print("\n".join(summary(reports) + [f"wrote {path}"]))
    if args.json:
        write_text_atomically(args.json, json.dumps([asdict(r) for r in reports], indent=2))
    return 0


def run_inspect(args) -> int:
    from finetune.export.describe import describe
    from finetune.tools.inspect_file import render

    info = describe(args.file)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print(render(info, all_shapes=args.all))
    return 0


HANDLERS = {"convert": run_convert, "merge": run_merge, "resize": run_resize, "inspect": run_inspect}
