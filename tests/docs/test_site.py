"""The documentation site builds offline with no warning (`mkdocs build --strict`: broken links, missing anchors,
pages left out of the nav), and README.md stays a short entry point that links every page of the site's nav."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
README_MAX_LINES = 250


def nav_top_level_pages() -> list[str]:
    """The page of each top-level entry of mkdocs.yml's nav (a section: its first page), relative to docs/."""
    config = yaml.load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"), Loader=yaml.BaseLoader)
    pages = []
    for entry in config["nav"]:
        target = next(iter(entry.values())) if isinstance(entry, dict) else entry
        while isinstance(target, list):  # a section: its first entry, itself a page or a titled page
            target = target[0]
            if isinstance(target, dict):
                target = next(iter(target.values()))
        pages.append(target)
    return pages


def test_the_site_builds_strict_with_no_warning(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    warnings = [line for line in output.splitlines() if "WARNING" in line]
    assert result.returncode == 0 and not warnings, output
    assert (tmp_path / "site" / "index.html").is_file()


def test_the_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) < README_MAX_LINES, f"README.md has {len(lines)} lines: move the detail to a page in docs/"


def test_the_readme_links_every_top_level_page_of_the_site():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    linked = set(re.findall(r"\]\(docs/([^)#\s]+)", readme))
    pages = nav_top_level_pages()
    assert "index.md" in pages and len(pages) >= 10
    missing = [page for page in pages if page not in linked]
    assert missing == [], f"README.md links no docs/ page for {missing}"
    assert all((ROOT / "docs" / page).is_file() for page in linked), "README.md links a docs/ page that is not there"


def test_the_readme_strategy_table_names_the_families_each_strategy_works_on():
    """The first screen's status of each strategy agrees with the family specs (the generated family table):
    `works on `a`, `b`` names every family that trains it, `works (not `c`...)` every family that refuses it."""
    from finetune.models import specs

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `(\w+)` \(.*\) \| (.*) \|$", readme, flags=re.MULTILINE))
    assert set(rows) == {"lora", "dreambooth", "textual_inversion", "hypernetwork"}, rows
    for kind, status in rows.items():
        refusing = {spec.name for spec in specs().values() if kind in spec.refuses}
        named = set(re.findall(r"`(\w+)`", status))
        if status.startswith("works on "):
            assert named == {spec.name for spec in specs().values()} - refusing, (kind, status)
        elif status.startswith("works (not "):
            assert named == refusing, (kind, status)
        else:
            assert status == "works" and not refusing, (kind, status)
