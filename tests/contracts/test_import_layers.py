"""Imports point down (issue 34): the back-up arrows the review found, once moved, stay gone. Each module's imports
are read from its source, at module level and inside functions alike (a lazy import still points where it points).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "finetune"

# (modules, what they must not import, why): a name covers the module and everything below it
FORBIDDEN = [
    ("finetune.strategies", ("finetune.training",),
     "a strategy is used by the loop; what both need (finetune.distributed) sits below both"),
    ("finetune.training", ("finetune.tools", "finetune.demo", "finetune.cli"),
     "the loop is library; commands and the demo sit above it (a file's description is export.describe's)"),
    ("finetune.report", ("finetune.training", "finetune.demo"),
     "the loop writes its report: report/ is below the loop, the demo's page above both"),
    ("finetune.shapes", ("finetune.demo", "finetune.training", "finetune.strategies", "finetune.cli"),
     "the shapes world and its evaluator judge pipelines; the demo that trains them is above"),
    # the file-I/O helpers (safetensors_io, pickle_files) are allowed: they are low, and leave export/ for finetune/io/
    ("finetune.models", ("finetune.export.single_file", "finetune.export.single_file_sdxl", "finetune.export.formats",
                         "finetune.export.lora", "finetune.export.describe", "finetune.export.single_file_writers"),
     "a family says how it loads, trains and samples; writing its files is export's (looked up by the family's name)"),
    ("finetune.models.tiny_transformers", ("finetune.models.tiny",),
     "the tiny builders share tiny_clip.py instead of importing each other"),
    ("finetune.models.tiny", ("finetune.models.tiny_transformers",),
     "the tiny builders share tiny_clip.py instead of importing each other"),
]
# only the command line starts the demo
DEMO_IMPORTERS = ("finetune.cli", "finetune.demo")


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imported(module: str, path: Path) -> set[str]:
    """Every module name `module`'s file imports (absolute; `from a import b` gives a and a.b)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0]
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


IMPORTS = {module: _imported(module, path) for module, path in _modules().items()}


@pytest.mark.parametrize("lower, upper, why", FORBIDDEN, ids=[rule[0] for rule in FORBIDDEN])
def test_no_import_points_up(lower, upper, why):
    wrong = sorted(f"{module} imports {name}" for module, names in IMPORTS.items() if _within(module, lower)
                   for name in names if any(_within(name, above) for above in upper))
    assert not wrong, f"{'; '.join(wrong)} ({why})"


def test_only_the_command_line_imports_the_demo():
    wrong = sorted(f"{module} imports {name}" for module, names in IMPORTS.items()
                   if not any(_within(module, allowed) for allowed in DEMO_IMPORTERS)
                   for name in names if _within(name, "finetune.demo"))
    assert not wrong, "; ".join(wrong)


def test_the_rules_name_modules_that_exist():
    # a rule about a module that moved away would pass forever without checking anything
    modules = set(IMPORTS)
    named = {lower for lower, _, _ in FORBIDDEN} | {name for _, upper, _ in FORBIDDEN for name in upper}
    assert not {name for name in named if not any(_within(m, name) for m in modules)}
