"""`finetune env` (what a bug report needs) and the package check that `train`, `validate` and the other
commands run before any model loads."""
from __future__ import annotations

import importlib.metadata
import sys

import pytest

from finetune import environment
from finetune.cli import main
from tests.helpers import recipe_dict


def test_env_prints_what_a_bug_report_needs(capsys):
    import torch

    assert main(["env"]) == 0
    out = capsys.readouterr().out
    rows = dict(line.split(":", 1) for line in out.splitlines())
    assert rows["finetune"].strip().startswith(__import__("finetune").__version__)
    assert rows["python"].strip().startswith(".".join(map(str, sys.version_info[:3])))
    assert torch.__version__ in rows["torch"] and "CUDA build" in rows["torch"]
    assert "cpu only" in rows["accelerator"] or "cuda:0" in rows["accelerator"]
    for name in ("diffusers", "transformers", "peft", "accelerate", "datasets", "safetensors"):
        assert rows[name].strip() == importlib.metadata.version(name), name
    assert rows["problems"].strip() == "none found"
    from finetune.models import specs  # every registered family, listed by name

    assert [item.split(" (")[0] for item in rows["families"].strip().split(", ")] == list(specs())


def test_this_environment_passes_the_check():
    environment.check_packages()  # raises IncompatiblePackages otherwise


def fake_versions(monkeypatch, **versions):
    real = environment.installed_version
    monkeypatch.setattr(environment, "installed_version",
                        lambda name: versions.get(name.replace("-", "_"), real(name)))


@pytest.mark.parametrize("conflict", environment.KNOWN_CONFLICTS, ids=lambda c: " ".join(c.when))
def test_every_known_conflict_is_found_and_names_the_fix(conflict, monkeypatch):
    from packaging.requirements import Requirement

    # a version inside each requirement's range: the oldest bound it names, or a very old one for "<X" alone
    versions = {}
    for text in conflict.when:
        requirement = Requirement(text)
        candidates = [s.version for s in requirement.specifier if s.operator in (">=", "==")] + ["0.0.1"]
        versions[requirement.name] = next(v for v in candidates if requirement.specifier.contains(v, True))
    fake_versions(monkeypatch, **versions)
    problems = environment.conflict_problems()
    assert len(problems) == 1
    assert all(f"{name} {version}" in problems[0] for name, version in versions.items())
    assert conflict.fix in problems[0]


def test_a_version_outside_a_declared_range_is_named_with_who_asks(monkeypatch):
    fake_versions(monkeypatch, peft="0.17.1")
    problems = environment.declared_problems()
    assert any(p.startswith("finetune needs peft>=") and "peft 0.17.1 is installed" in p for p in problems)


def test_a_package_imported_when_present_is_checked_against_its_own_pins(tmp_path, monkeypatch):
    # like PyPI's torchvision next to another torch build: it pins the torch it was built for
    info = tmp_path / "fakevision-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakevision\nVersion: 1.0\n"
                                   "Requires-Dist: torch==1.0.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(environment, "IMPORTED_WHEN_PRESENT", ("fakevision",))
    problems = environment.declared_problems()
    assert any(p.startswith("fakevision needs torch==1.0.0, but torch ") for p in problems), problems


@pytest.mark.parametrize("command", ["train", "validate"])
def test_train_and_validate_stop_before_any_model_loads(command, monkeypatch, tmp_path, capsys, tiny_base,
                                                        concept_dir):
    import yaml

    from finetune.training import run

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(tiny_base, concept_dir, tmp_path / "out")))
    fake_versions(monkeypatch, transformers="5.10.4", peft="0.18.1")
    # where setup looks the family up: the command line gives setup no family of its own
    monkeypatch.setattr(run, "family_for", lambda *args: pytest.fail("a model family was asked for"))
    assert main([command, str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "transformers 5.10.4 with peft 0.18.1" in err and "pip install 'peft>=0.20'" in err
    assert "constraints.txt" in err and "finetune env" in err
    assert not (tmp_path / "out").exists()


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"finetune {__import__('finetune').__version__}"
