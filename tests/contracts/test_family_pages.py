"""The docs site's family pages follow the registry: every registered family has its page in the site's
navigation, and the families index holds the table the specs give (as the README does), so a new family or a
changed refusal cannot leave the docs behind."""
from __future__ import annotations

import re
from pathlib import Path

from finetune.models import specs
from finetune.tools.family_table import END, START, family_table

ROOT = Path(__file__).resolve().parents[2]
PAGES = ROOT / "docs" / "families"


def test_the_families_index_table_is_the_one_the_specs_give():
    index = (PAGES / "index.md").read_text(encoding="utf-8")
    table = index.split(START, 1)[1].split(END, 1)[0].strip()
    assert table == family_table(), "stale: run python -m finetune.tools.family_table docs/families/index.md"


def test_every_family_has_a_page_in_the_navigation():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    index = (PAGES / "index.md").read_text(encoding="utf-8")
    for name in specs():
        page = PAGES / f"{name}.md"
        assert page.is_file(), f"no docs page for family {name}: write {page.relative_to(ROOT)}"
        assert re.search(rf"\bfamilies/{name}\.md\b", nav), f"mkdocs.yml's nav does not list families/{name}.md"
        assert f"]({name}.md)" in index, f"docs/families/index.md does not link {name}.md"
