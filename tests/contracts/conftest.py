"""Fixtures the contract tests share."""
from __future__ import annotations

import pytest

from finetune.models import specs
from finetune.models.tiny import save_tiny_pipeline


@pytest.fixture(scope="session")
def tiny_bases(tiny_base, tmp_path_factory):
    """Every family's tiny base, saved once for the session (SD's is the suite's tiny_base)."""
    return {name: tiny_base if name == "sd" else save_tiny_pipeline(tmp_path_factory.mktemp(name) / "base",
                                                                     family=name) for name in specs()}
