"""The command line's arguments: each `finetune` command and its options; finetune/cli.py runs them."""
from __future__ import annotations

import argparse

DESCRIPTION = "Fine-tune text-to-image diffusion models: one training loop, YAML recipes."
EPILOG = ("Docs: docs/index.md (each command's --help names its own page).\n"
          "As a site: pip install -e '.[docs]' -c constraints.txt && mkdocs serve")
# the page of docs/ (in mkdocs.yml's nav) each command's --help points to: one place, so that a command added
# without a page stops parser() at once instead of shipping a --help that leads nowhere
DOCS_PAGES = {"train": "training.md", "validate": "training.md", "report": "training.md",
              "sample": "getting-started.md", "env": "getting-started.md",
              "eval": "shapes-world.md", "demo": "shapes-world.md",
              "extract-lora": "formats.md", "convert": "formats.md", "merge": "formats.md", "resize": "formats.md",
              "inspect": "formats.md"}


def parser() -> argparse.ArgumentParser:
    """`finetune`'s argument parser: every command with its options (the file tools' in tools/commands.py)."""
    from finetune import __version__

    # raw: the epilog's two lines stay two lines
    parser = argparse.ArgumentParser(prog="finetune", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"finetune {__version__}")
    # every command takes them after its name (the tools in tools/commands.py too, through add_parser)
    talk = argparse.ArgumentParser(add_help=False)
    talk.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors, no progress bars")
    talk.add_argument("-v", "--verbose", action="store_true",
                      help="everything, the libraries' own information and warnings included")
    commands = parser.add_subparsers(dest="command", required=True)
    add_parser = commands.add_parser

    def add_command(name: str, help: str, **kwargs) -> argparse.ArgumentParser:
        """A command with the shared options; its --help opens with what it does (the one line `finetune --help`
        lists) and ends with its docs page."""
        if name not in DOCS_PAGES:
            raise KeyError(f"`finetune {name}` has no docs page: name one in DOCS_PAGES (finetune/cli_arguments.py)")
        return add_parser(name, help=help, parents=[talk], description=help[0].upper() + help[1:] + ".",
                          epilog=f"Docs: docs/{DOCS_PAGES[name]}", **kwargs)

    commands.add_parser = add_command

    train = commands.add_parser("train", help="train with a YAML recipe (LoRA, DreamBooth, textual inversion, "
                                              "hypernetwork)")
    train.add_argument("recipe", help="YAML recipe")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.max_steps=100")
    train.add_argument("--resume", metavar="latest|PATH",
                       help="continue from the newest checkpoint in output_dir, or from a checkpoint folder")
    train.add_argument("--overwrite", action="store_true",
                       help="start anew in an output_dir that holds a finished run or checkpoints (refused without "
                            "it): the earlier checkpoints are removed, the artifact replaced when this run saves")

    validate = commands.add_parser("validate", help="check a recipe and its data without loading any model")
    validate.add_argument("recipe", nargs="?", help="YAML recipe (not needed with --keys)")
    validate.add_argument("overrides", nargs="*", metavar="key=value")
    validate.add_argument("--keys", nargs="?", const="-", metavar="FILE",
                          help="write the recipe reference (every key: type, default, bounds, help) as Markdown to "
                               "FILE (docs/recipes.md is this; an existing FILE only if it is such a page), or "
                               "print it; no recipe is read")
    validate.add_argument("--decode", action="store_true",
                          help="decode every image as training does (slower); by default their headers are read")

    sample = commands.add_parser("sample", help="generate a grid with a base model and an optional adapter")
    sample.add_argument("--base", required=True, help="hub id, diffusers folder or single checkpoint file")
    sample.add_argument("--adapter", help="artifact written by `finetune train`")
    sample.add_argument("--prompt", action="append", help="repeat for several rows")
    sample.add_argument("--prompt-file", help="kohya's prompt file instead of --prompt: .txt (one prompt a line, with "
                        "--n --w --h --d --s --l), .toml or .json; the options below are its defaults")
    sample.add_argument("--control", action="append", metavar="IMAGE",
                        help="an edit model's control image for every prompt (repeat, or a comma list, for several "
                             "control images in order); a prompt file entry's own control_image wins")
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
