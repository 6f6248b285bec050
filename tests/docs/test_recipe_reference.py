"""The recipe reference (docs/recipes.md) is generated from the schema and cannot drift from it; every key has help
text; bounds declared on a field are enforced where the recipe is read."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from finetune.recipe.keys import bounds_text, key
from finetune.recipe.reference import keys_without_help, reference_markdown
from finetune.recipe.typed import build

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "recipes.md"


def test_every_recipe_key_has_help_text():
    missing = keys_without_help()
    assert not missing, "keys without help text (declare them with key(default, help=...)):\n" + "\n".join(missing)


def test_the_committed_reference_is_what_the_schema_generates():
    assert PAGE.read_text() == reference_markdown(), (
        "docs/recipes.md differs from the schema: regenerate it with `finetune validate --keys docs/recipes.md`")


def test_the_reference_lists_every_section_and_the_keys_of_each_strategy_and_family():
    page = reference_markdown()
    for heading in ("## model", "## strategy", "## data", "## train", "## prior", "## sample", "## validation",
                    "## checkpoint", "## log", "## cache", "### strategy.kind: lora", "### strategy.kind: hypernetwork",
                    "### model.family: flux"):
        assert f"\n{heading}" in page, heading
    for dotted in ("`train.ema.decay`", "`model.flow.shift`", "`strategy.rank`", "`strategy.placeholder_token`",
                   "`data.caption_extension`", "`model.text_encoder_3`", "`output_dir`"):
        assert dotted in page, dotted


def test_types_and_defaults_read_as_a_recipe_writes_them():
    page = reference_markdown()
    for row in ("| `train.ema` | mapping or null | `null` |",  # an optional section says it is off by default
                "| `train.ema.decay` | number | `0.999` | at least 0 and below 1 |",
                "| `sample.negative_prompt` | text | `\"\"` |", "| `train.adam_epsilon` | number | `1e-8` |",
                "| `log.to` | list of `tensorboard`, `wandb` | `[]` |", "| `sample.prompts` | list | `[]` |"):
        assert row in page, row


def test_validate_keys_writes_the_page_and_never_reads_a_recipe(tmp_path):
    out = tmp_path / "recipes.md"
    done = subprocess.run([sys.executable, "-m", "finetune", "validate", "--keys", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert out.read_text() == reference_markdown()


@dataclass
class _Toy:
    repeats: int = key(1, "how often", minimum=1)
    dropout: float = key(0.0, "a probability", minimum=0, maximum=1)
    rate: Optional[float] = key(None, "positive or null", above=0, hint="1e-4 is usual")
    decay: float = key(0.9, "below one", minimum=0, below=1)


def test_bounds_declared_on_a_field_refuse_values_outside_them_naming_the_key():
    errors: list[str] = []
    built = build(_Toy, {"repeats": 0, "dropout": 1.5, "rate": -1.0, "decay": 1.0}, "toy", errors)
    assert errors == ["toy.repeats: must be at least 1, got 0", "toy.dropout: must be between 0 and 1, got 1.5",
                      "toy.rate: must be positive (1e-4 is usual), got -1.0",
                      "toy.decay: must be at least 0 and below 1, got 1.0"]
    assert built is not None
    errors.clear()
    build(_Toy, {"repeats": 1, "dropout": 1.0, "rate": None, "decay": 0.0}, "toy", errors)
    assert errors == []  # the bounds themselves, and null for an optional number, are allowed


def test_nan_and_infinity_break_any_bounds():
    """YAML reads .nan and .inf as numbers; a NaN passes every comparison, so the bounds refuse it by name."""
    errors: list[str] = []
    build(_Toy, {"dropout": float("nan"), "rate": float("inf")}, "toy", errors)
    assert errors == ["toy.dropout: must be between 0 and 1 and finite, got nan",
                      "toy.rate: must be positive and finite (1e-4 is usual), got inf"]


def test_every_default_is_inside_its_bounds():
    """Bounds are checked only for keys a recipe sets, so a default outside them would pass unnoticed."""
    from finetune.recipe.keys import out_of_bounds
    from finetune.recipe.reference import _all_option_classes, _rows

    for where, cls in _all_option_classes():
        for name, _, f in _rows(cls, where):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            assert out_of_bounds(f, default, name) is None, name


def test_bounds_are_shown_in_words():
    from dataclasses import fields

    assert [bounds_text(f) for f in fields(_Toy)] == ["at least 1", "between 0 and 1", "positive",
                                                     "at least 0 and below 1"]


def test_validate_without_a_recipe_or_keys_says_what_to_give():
    done = subprocess.run([sys.executable, "-m", "finetune", "validate"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0
    assert "name a recipe" in done.stderr and "--keys" in done.stderr


def test_validate_keys_never_overwrites_a_file_that_is_not_a_reference_page(tmp_path, capsys):
    """`finetune validate --keys recipe.yaml` reads recipe.yaml as --keys's FILE: the recipe must survive it."""
    from finetune.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  max_steps: 10\n")
    assert main(["validate", "--keys", str(recipe)]) == 2
    assert "is not a recipe reference page, so it is left as it is" in capsys.readouterr().err
    assert recipe.read_text() == "train:\n  max_steps: 10\n"
    assert main(["validate", "--keys", str(tmp_path)]) == 2 and "is a folder" in capsys.readouterr().err
    page = tmp_path / "recipes.md"
    page.write_text(reference_markdown().replace("| `train.max_steps` |", "| `train.old_key` |"))  # a stale page
    assert main(["validate", "--keys", str(page)]) == 0
    assert page.read_text() == reference_markdown()


def test_validate_keys_with_a_recipe_is_refused_rather_than_leaving_the_recipe_unchecked(tmp_path, capsys):
    from finetune.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  max_steps: 10\n")
    assert main(["validate", str(recipe), "train.max_steps=3", "--keys"]) == 2
    shown = capsys.readouterr()
    assert "reads no recipe: leave out" in shown.err and f"{recipe} train.max_steps=3" in shown.err
    assert "# Recipe reference" not in shown.out
