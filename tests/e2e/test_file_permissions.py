"""Every file finetune writes gets the permissions the umask gives (safetensors alone would make its files 0600,
unreadable by another user or a container): artifacts of every strategy and format, checkpoints, sample
grids, and the tools' outputs (convert, merge, resize, extract-lora)."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from finetune.cli import main
from finetune.recipe.load import parse_recipe
from finetune.training.loop import train
from tests.helpers import STRATEGIES, recipe_dict

# group-writable: a hard-coded 0644 would fail, only "what the umask gives" passes
UMASK = 0o002


@pytest.fixture
def umask():
    old = os.umask(UMASK)
    yield UMASK
    os.umask(old)


def wrong_modes(root: Path) -> list[str]:
    wrong = []
    for path in [root, *root.rglob("*")]:
        expected = (0o777 if path.is_dir() else 0o666) & ~UMASK
        if stat.S_IMODE(path.stat().st_mode) != expected:
            wrong.append(f"{path.relative_to(root)}: {oct(stat.S_IMODE(path.stat().st_mode))}")
    return wrong


@pytest.mark.parametrize("strategy", STRATEGIES.values(), ids=STRATEGIES.keys())
def test_a_run_writes_every_file_with_the_umask_permissions(umask, strategy, tiny_base, concept_dir, tmp_path):
    out = tmp_path / "out"
    train(parse_recipe(recipe_dict(tiny_base, concept_dir, out, strategy=strategy, train={"max_steps": 2},
                                   checkpoint={"every": 1},
                                   sample={"every": 2, "prompts": ["a sks"], "steps": 1})))
    written = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in written) and any(p.suffix == ".png" for p in written)
    assert any("checkpoints" in p.parts for p in written)
    assert wrong_modes(out) == []


def test_the_file_tools_write_with_the_umask_permissions(umask, lora_file, tiny_base, tmp_path):
    tools = tmp_path / "tools"
    tools.mkdir()
    assert main(["convert", str(lora_file), str(tools / "kohya.safetensors"), "--to", "kohya"]) == 0
    assert main(["resize", str(lora_file), str(tools / "resized.safetensors"), "--rank", "1"]) == 0
    assert main(["merge", "--base", str(tiny_base), "--lora", str(lora_file), "--out", str(tools / "merged")]) == 0
    assert main(["merge", "--base", str(tiny_base), "--lora", str(lora_file),
                 "--out", str(tools / "merged.safetensors")]) == 0
    assert main(["extract-lora", "--tuned", str(tools / "merged"), "--base", str(tiny_base), "--rank", "2",
                 "--out", str(tools / "extracted.safetensors")]) == 0
    assert len([p for p in tools.rglob("*.safetensors")]) >= 6
    assert wrong_modes(tools) == []
