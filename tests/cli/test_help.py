"""`finetune --help` and each command's --help (issue 39, item 6): a command's help says in one line what it does
and names its docs page, a page of docs/ that mkdocs.yml's nav shows; the top-level help names docs/index.md and
how to read the docs as a site."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from finetune import cli_arguments
from finetune.cli import main

ROOT = Path(__file__).resolve().parents[2]
DOCS_LINK = re.compile(r"\bdocs/([\w/.-]+\.md)\b")


def nav_pages() -> set[str]:
    """Every page of mkdocs.yml's nav, as a path under docs/ (families/sd.md)."""
    def walk(entry):
        if isinstance(entry, str):
            yield entry
        elif isinstance(entry, list):
            for item in entry:
                yield from walk(item)
        elif isinstance(entry, dict):
            for value in entry.values():
                yield from walk(value)

    return set(walk(yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["nav"]))


def _subparsers():
    return next(a for a in cli_arguments.parser()._actions if a.dest == "command")


COMMANDS = sorted(_subparsers().choices)


def _flat(text: str) -> str:
    return " ".join(text.split())  # argparse wraps to the terminal's width


@pytest.mark.parametrize("name", COMMANDS)
def test_each_command_says_what_it_does_and_names_its_docs_page(name):
    command = _subparsers().choices[name]
    description = command.description or ""
    assert description.strip() and "\n" not in description, f"finetune {name}: no one-line description"
    shown = command.format_help()
    assert _flat(description) in _flat(shown)
    pages = DOCS_LINK.findall(shown)
    assert pages, f"`finetune {name} --help` names no docs page:\n{shown}"
    for page in pages:
        assert (ROOT / "docs" / page).is_file(), f"finetune {name}: docs/{page} does not exist"
        assert page in nav_pages(), f"finetune {name}: docs/{page} is not in mkdocs.yml's nav"
        # the page it points to is about it, not just any page of the site
        assert f"finetune {name}" in (ROOT / "docs" / page).read_text(encoding="utf-8"), \
            f"docs/{page}, which `finetune {name} --help` points to, never mentions `finetune {name}`"


@pytest.mark.parametrize("name", COMMANDS)
def test_each_command_has_its_line_in_the_top_level_list(name):
    listed = {action.dest: action.help for action in _subparsers()._choices_actions}
    assert listed.get(name) and "\n" not in listed[name]


def test_top_level_help_names_the_docs_index_and_how_to_build_the_site(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    shown = capsys.readouterr().out
    assert stop.value.code == 0
    assert "Docs: docs/index.md" in shown and "index.md" in nav_pages() and (ROOT / "docs" / "index.md").is_file()
    assert "pip install -e '.[docs]' -c constraints.txt && mkdocs serve" in shown


def test_the_site_command_in_the_help_installs_what_it_runs():
    """The extras the top-level help installs exist in pyproject and bring mkdocs; the constraints file exists."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    named = re.findall(r"'\.\[([\w,-]+)\]'", cli_arguments.EPILOG)
    assert named and all(any(r.startswith("mkdocs") for e in n.split(",") for r in extras[e]) for n in named)
    assert (ROOT / re.search(r"-c (\S+)", cli_arguments.EPILOG)[1]).is_file()


def test_a_command_added_without_a_docs_page_stops_the_parser(monkeypatch):
    monkeypatch.setattr(cli_arguments, "DOCS_PAGES", {k: v for k, v in cli_arguments.DOCS_PAGES.items()
                                                      if k != "merge"})
    with pytest.raises(KeyError, match="`finetune merge` has no docs page"):
        cli_arguments.parser()
