"""benchmarks/gpu_check.sh runs only on a lent GPU machine, where a stale flag would cost the whole check: every
benchmark command it holds must parse with its script's own arguments, and its training command's overrides
must make a valid recipe."""
from __future__ import annotations

import importlib
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
SCRIPT = (ROOT / "benchmarks" / "gpu_check.sh").read_text()


def commands() -> list[list[str]]:
    """Each `step NAME SECONDS COMMAND...` line, continuation lines joined and variables filled in."""
    text = SCRIPT.replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        if line.startswith("step "):
            words = shlex.split(line)[3:]
            found.append([re.sub(r'\$\{?(\w+)(:-[^}]*)?\}?', "X", w).replace('"', "") for w in words])
    return found


@pytest.mark.parametrize("script", ["step_time", "flops"])
def test_every_benchmark_command_parses(script, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    module = importlib.import_module(script)
    runs = [c for c in commands() if f"benchmarks/{script}.py" in c]
    assert runs, f"gpu_check.sh no longer runs {script}.py"
    for command in runs:
        arguments = command[command.index(f"benchmarks/{script}.py") + 1:]
        arguments = [a if not a.startswith("X") else "1" for a in arguments]  # $PEAK -> a number
        monkeypatch.setattr(sys, "argv", [script, *arguments])
        parsed = module._arguments()
        assert parsed.model in ("sd15", "sdxl", "flux") and parsed.resolution in (None, 1024)


def test_the_fsdp_command_is_a_valid_recipe(tmp_path):
    from finetune.models.tiny import save_tiny_pipeline
    from finetune.recipe.load import load_recipe

    (train,) = [c for c in commands() if "train" in c]
    recipe = train[train.index("train") + 1]
    overrides = [o for o in train[train.index(recipe) + 1:] if "=" in o]
    tiny_flux = save_tiny_pipeline(tmp_path / "tiny-flux", family="flux")  # what the script builds first
    overrides = [f"model.base={tiny_flux}" if o.startswith("model.base=") else
                 f"data.images={ROOT / o.split('=', 1)[1]}" if o.startswith("data.images=") else o for o in overrides]
    loaded = load_recipe(ROOT / recipe, overrides)
    assert loaded.strategy.kind == "dreambooth" and loaded.train.max_steps == 4 and loaded.sample.every == 0
