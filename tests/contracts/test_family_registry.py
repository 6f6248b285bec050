"""The family registry is the one place a family is named: the README's table, detection, validation, the tiny
builds and the contract tests read the registered specs (finetune/models/__init__.py FAMILY_MODULES)."""
from __future__ import annotations

import ast
from pathlib import Path

from finetune.models import FAMILY_MODULES, specs
from finetune.tools.family_table import END, START, family_table

ROOT = Path(__file__).resolve().parents[2]


def test_the_readme_family_table_is_the_one_the_specs_give():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split(START, 1)[1].split(END, 1)[0].strip()
    assert table == family_table(), "stale: run python -m finetune.tools.family_table README.md"
    for spec in specs().values():
        assert f"| `{spec.name}` | {spec.title} |" in table


def test_no_module_outside_models_names_a_family():
    """Outside finetune/models/, no module imports a family's file or holds a family's name as a string: what
    differs per family is read from its spec, so a new family is its file and one registry line."""
    names = set(specs())
    found = []
    for path in sorted((ROOT / "finetune").rglob("*.py")):
        if "models" in path.relative_to(ROOT / "finetune").parts[:1]:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
            if isinstance(node, ast.ImportFrom) and node.module in FAMILY_MODULES:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: imports {node.module}")
            if isinstance(node, ast.ImportFrom) and node.module == "finetune.models":
                found += [f"{path.relative_to(ROOT)}:{node.lineno}: imports {alias.name}" for alias in node.names
                          if f"finetune.models.{alias.name}" in FAMILY_MODULES]
    assert found == []


def test_every_family_module_declares_a_spec_of_its_own():
    for module, spec in zip(FAMILY_MODULES, specs().values()):
        assert spec.behaviour.__module__ == module and spec.options.__module__ == module, module
        # composed, never inherited from another family: the behaviour's only family ancestor is Family
        from finetune.models.family import Family

        assert spec.behaviour.__bases__ == (Family,), spec.name


def test_a_hub_ids_family_told_at_loading_takes_the_recipes_common_keys_or_refuses_what_it_cannot_read():
    """model.family: auto reads a hub id's recipe as sd's before loading tells the family: the common keys carry
    over to the told family's options; an option only the first family reads stops the run, naming what to set."""
    import pytest

    from finetune.models import spec_of
    from finetune.recipe.load import RecipeError, options_for

    read_as_sd = spec_of("sd").options(base="someone/a-flux-model", quantize="int8")
    told = options_for(spec_of("flux"), read_as_sd)
    assert type(told) is spec_of("flux").options and told.base == "someone/a-flux-model" and told.quantize == "int8"
    assert options_for(spec_of("sd"), read_as_sd) is read_as_sd
    read_as_sd.min_snr_gamma = 5.0
    with pytest.raises(RecipeError, match="model.min_snr_gamma: .* set model.family: flux"):
        options_for(spec_of("flux"), read_as_sd)


def test_a_module_a_family_needs_is_named_before_loading_when_it_does_not_import():
    from dataclasses import replace

    from finetune.recipe.checks import missing_modules

    spec = replace(specs()["sd"], needs={"finetune_no_such_module": "its processor", "json": "reading configs"})
    problems = missing_modules(spec)
    assert len(problems) == 1, problems
    assert "needs finetune_no_such_module (its processor)" in problems[0]
    assert "install the finetune_no_such_module release built for the torch you have" in problems[0]
