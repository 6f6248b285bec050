"""The suite's own layout: test files grouped by what they promise, and what they share in tests/helpers.py (a
test module that imports another runs that module's tests' setup and couples two files that should change apart)."""
from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
GROUPS = {"contracts", "families", "formats", "cli", "unit", "e2e", "docs"}


def _imported_modules(source: str, package: str) -> list[str]:
    """Every module `source` (a file of `package`) imports, at module level or in a function, as absolute dotted
    names (for `from a import b`, both `a` and `a.b`: b may be a module)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's own package up
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], *([base] if base else [])])
            found += [base, *(f"{base}.{alias.name}" for alias in node.names)]
    return found


def _is_test_module(name: str) -> bool:
    last = name.rsplit(".", 1)[-1]
    return name.startswith("tests.") and (last.startswith("test_") or last == "conftest")


def test_no_test_module_imports_another_test_module_or_conftest():
    wrong = []
    for path in sorted(TESTS.rglob("*.py")):
        package = ".".join(path.relative_to(TESTS.parent).parent.parts)
        for name in _imported_modules(path.read_text(encoding="utf-8"), package):
            if _is_test_module(name):
                wrong.append(f"{path.relative_to(TESTS.parent)} imports {name}")
    assert not wrong, "what test modules share belongs in tests/helpers.py:\n" + "\n".join(wrong)


def test_the_import_check_sees_every_form_of_import():
    source = ("from tests.cli.test_console import x\nimport tests.e2e.test_lora\n"
              "def f():\n    from ..unit import test_data\n    from tests import conftest\n    from . import helpers\n")
    found = {name for name in _imported_modules(source, "tests.e2e") if _is_test_module(name)}
    assert found == {"tests.cli.test_console", "tests.e2e.test_lora", "tests.unit.test_data", "tests.conftest"}


def test_every_test_file_sits_in_a_group():
    flat = sorted(path.name for path in TESTS.glob("test_*.py"))
    assert not flat, f"put these in one of tests/{{{','.join(sorted(GROUPS))}}}/: {flat}"
    groups = {path.parent.name for path in TESTS.rglob("test_*.py")}
    assert groups <= GROUPS, f"a test folder outside the groups: {sorted(groups - GROUPS)}"
