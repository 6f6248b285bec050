"""The README's model-family table, written from the registered family specs (finetune/models/), so that it
cannot drift from what the code trains: `python -m finetune.tools.family_table README.md` rewrites the table
between its markers; tests/contracts/test_family_registry.py fails when the README's copy is stale."""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

START, END = "<!-- families:start -->", "<!-- families:end -->"
STRATEGIES = {"lora": "LoRA", "dreambooth": "DreamBooth", "textual_inversion": "textual inversion",
              "hypernetwork": "hypernetwork"}


def family_table() -> str:
    """Two markdown tables, one row per registered family each: model.family, models, pipeline, objective, what
    each strategy does on it, the LoRA files written and how many lines its file took; and what its objective
    does by default, with the source."""
    from finetune.models import FAMILY_MODULES, specs

    head = ("| `model.family` | models | diffusers pipeline | objective | " + " | ".join(STRATEGIES.values())
            + " | LoRA files (`strategy.formats`) | family file |")
    rows = [head, "|" + " --- |" * (head.count("|") - 1)]
    for module, spec in zip(FAMILY_MODULES, specs().values()):
        path = Path(importlib.util.find_spec(module).origin)
        lines = len(path.read_text(encoding="utf-8").splitlines())
        cells = [f"refused: {spec.refuses[kind]}" if kind in spec.refuses else "yes" + "".join(
            f" (not with `{key.partition('.')[2]}`: {reason})" for key, reason in spec.refuses.items()
            if key.startswith(f"{kind}.")) for kind in STRATEGIES]
        formats = ["diffusers"] + (["kohya"] if spec.kohya_unet_layout != "none" else []) + (
            ["comfyui"] if spec.comfyui_names is not None else [])
        pipelines = ", ".join(f"`{name}`" for name in (spec.pipeline, *spec.also_recognised))
        rows.append(f"| `{spec.name}` | {spec.title} | {pipelines} | {spec.objective.replace('_', ' ')} | "
                    + " | ".join(cells) + f" | {', '.join(formats)} | `models/{path.name}`, {lines} lines |")
    rows += ["", "| `model.family` | the objective by default, and where it comes from |", "| --- | --- |"]
    rows += [f"| `{spec.name}` | {spec.objective_defaults} |" for spec in specs().values()]
    return "\n".join(rows)


def rewrite(readme: str) -> str:
    """`readme`'s text with the table between START and END replaced; ValueError when the markers are missing."""
    if START not in readme or END not in readme:
        raise ValueError(f"the README has no {START} ... {END} markers to write the family table between")
    before, rest = readme.split(START, 1)
    _, after = rest.split(END, 1)
    return f"{before}{START}\n{family_table()}\n{END}{after}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m finetune.tools.family_table",
                                     description="Rewrite the README's model-family table from the family specs.")
    parser.add_argument("readme", nargs="?", default="README.md")
    path = Path(parser.parse_args().readme)
    path.write_text(rewrite(path.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"wrote the family table in {path}")
