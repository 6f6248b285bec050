"""finetune/io/atomic.py, the one atomic write: a failed write leaves the earlier file or folder as it was and no
temporary behind, a killed run's temporaries are found under every name they ever had, and nothing outside
finetune/io/ renames files by hand."""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

import finetune
from finetune.io.atomic import (MOVED_ASIDE, atomic_dir, atomic_file, stale_temporaries, temporary_path,
                                write_text_atomically)
from finetune.training.checkpoint import remove_stale_temporaries

PACKAGE = Path(finetune.__file__).parent


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("durable", [True, False])
def test_a_file_is_replaced_whole_and_a_failed_write_leaves_the_earlier_one(tmp_path, durable):
    target = tmp_path / "deep" / "file.txt"
    with atomic_file(target, durable=durable) as tmp:  # the folder is made
        assert tmp.parent == target.parent and tmp.name == f".file.txt.tmp-{os.getpid()}"
        tmp.write_text("first")
    assert target.read_text() == "first"
    with pytest.raises(Interrupted):
        with atomic_file(target, durable=durable) as tmp:
            tmp.write_text("half of the sec")
            raise Interrupted
    assert target.read_text() == "first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.txt"]


def test_write_text_atomically_names_the_file_on_a_full_disk(tmp_path, monkeypatch):
    from finetune.file_errors import FileProblem

    target = write_text_atomically(tmp_path / "report.json", "{}")
    real_write = Path.write_text

    def full(self, *args, **kwargs):
        real_write(self, "{")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(FileProblem, match="no room left") as raised:
        write_text_atomically(target, '{"a": 1}')
    assert str(target) in str(raised.value) and ".tmp" not in str(raised.value)
    assert target.read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


@pytest.mark.parametrize("durable", [True, False])
def test_a_folder_is_swapped_whole_and_a_failed_write_leaves_the_earlier_one(tmp_path, durable):
    target = tmp_path / "pipeline"
    with atomic_dir(target, durable=durable) as tmp:
        assert tmp.is_dir() and not any(tmp.iterdir())
        (tmp / "unet").mkdir()
        (tmp / "unet" / "weights").write_text("first")
    assert (target / "unet" / "weights").read_text() == "first"
    with atomic_dir(target, durable=durable) as tmp:  # an existing folder is replaced, nothing of it kept
        (tmp / "model_index.json").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == ["model_index.json"]
    with pytest.raises(Interrupted):
        with atomic_dir(target, durable=durable) as tmp:
            (tmp / "model_index.json").write_text("half")
            raise Interrupted
    assert (target / "model_index.json").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline"]


def test_a_folder_left_by_an_earlier_process_with_the_same_id_is_cleared_first(tmp_path):
    target = tmp_path / "step-000004"
    leftover = temporary_path(target)
    leftover.mkdir()
    (leftover / "trainable.safetensors").write_text("half")
    with atomic_dir(target) as tmp:
        assert tmp == leftover and not any(tmp.iterdir())
        (tmp / "state.json").write_text("{}")
    assert sorted(p.name for p in target.iterdir()) == ["state.json"]


def test_a_resume_removes_the_temporaries_of_the_one_rule_and_of_the_names_before_it(tmp_path):
    out, pid = tmp_path / "out", 4242
    stale_files = [out / f".pytorch_lora_weights.safetensors.tmp-{pid}",  # the one rule
                   # the names before finetune.io.atomic: a run killed before the change still resumes clean
                   out / f".report.html.{pid}.tmp", out / "samples" / ".step-000002.png.tmp"]
    stale_folders = [out / "checkpoints" / f".step-000003.tmp-{pid}", out / f".pipeline.{MOVED_ASIDE}-{pid}",
                     out / ".pipeline.tmp", out / "checkpoints" / ".tmp-step-000003"]
    kept = [out / "pipeline", out / f".merged.{MOVED_ASIDE}-{pid}"]  # the second is merged's only copy
    for folder in stale_folders + kept:
        folder.mkdir(parents=True)
        (folder / "weights").write_text("half")
    for path in stale_files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("half")
    assert stale_temporaries(out / "checkpoints") == [out / "checkpoints" / f".step-000003.tmp-{pid}"]
    assert sorted(remove_stale_temporaries(out)) == sorted(stale_files + stale_folders)
    assert not any(path.exists() for path in stale_files + stale_folders)
    assert all(path.exists() for path in kept)


def _renames(tree: ast.AST) -> list[tuple[int, str]]:
    """Where a module renames a file by hand: os.replace/os.rename/os.renames/shutil.move called or imported,
    and a Path's .rename(x) or one-argument .replace(x) (str.replace takes two, dataclasses.replace keywords)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("os", "shutil"):
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names
                      if a.name in ("replace", "rename", "renames", "move")]
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        name, owner = node.func.attr, node.func.value
        module = owner.id if isinstance(owner, ast.Name) and owner.id in ("os", "shutil") else None
        if module and name in ("replace", "rename", "renames", "move"):
            found.append((node.lineno, f"{module}.{name}"))
        elif not module and (name == "rename" or (name == "replace" and len(node.args) == 1 and not node.keywords)):
            found.append((node.lineno, f".{name}()"))
    return found


def test_no_module_outside_finetune_io_renames_files_by_hand():
    """Every atomic write goes through finetune/io/atomic.py, so one naming rule covers what a killed run leaves
    (and remove_stale_temporaries knows it)."""
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 50
    by_hand = [f"{path.relative_to(PACKAGE.parent)}:{line}: {what}" for path in modules
               if PACKAGE / "io" not in path.parents
               for line, what in _renames(ast.parse(path.read_text(encoding="utf-8")))]
    assert not by_hand, "write through finetune.io.atomic (atomic_file, atomic_dir) instead:\n" + "\n".join(by_hand)
    # the check itself sees what it is for
    assert sorted(w for _, w in _renames(ast.parse((PACKAGE / "io" / "atomic.py").read_text()))) == [
        ".rename()", "os.replace", "os.replace"]
    assert len(_renames(ast.parse("from os import rename\nshutil.move(a, b)\np.replace(q)\ns.replace('a', 'b')"))) == 3
