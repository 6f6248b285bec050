"""Every command or setting a message suggests works as printed (issue 32): the settings exist and take the values
suggested, the commands parse (tests/suggestions.py), and the commands that go on from a stopped or refused run
(Ctrl-C, an output_dir in use, nothing to resume, a full disk) do what the message says when run as printed.
Each row of tests/bad_inputs.py is checked the same way by tests/cli/test_bad_inputs.py."""
from __future__ import annotations

import ast
import os
import shlex
import signal
from pathlib import Path

import pytest

from finetune.cli import main
from tests import suggestions
from tests.bad_inputs import CATALOGUE, Workspace
from tests.helpers import reset_accelerate

PACKAGE = Path(__file__).resolve().parents[2] / "finetune"
ARTIFACT = "pytorch_lora_weights.safetensors"


def message_strings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string in a source file but its docstrings; an f-string's {...} becomes "\\0"."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body \
                and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant):
            skipped.add(id(node.body[0].value))
        if isinstance(node, ast.JoinedStr):
            skipped.update(id(part) for part in node.values)  # read as part of their f-string
    strings = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            strings.append((node.lineno, node.value))
        elif isinstance(node, ast.JoinedStr):
            strings.append((node.lineno, "".join(part.value if isinstance(part, ast.Constant) else "\0"
                                                 for part in node.values)))
    return strings


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_string_in_the_source_names_a_setting_or_command_that_does_not_work(path):
    """Messages that are hard to provoke on a CPU (SDXL, Flux, a GPU, a missing package) are read from the source:
    their keys must exist, their literal values pass, their backticked commands parse."""
    found = [f"line {line}: {problem}" for line, text in message_strings(path)
             for problem in suggestions.problems(text, in_source=True)]
    assert found == []


@pytest.mark.parametrize("case", CATALOGUE, ids=lambda case: case.name)
def test_docs_troubleshooting_answers_suggest_what_works(case):
    """docs/troubleshooting.md's table (its answer column; the problem column shows the user's mistakes) is the catalogue's."""
    assert suggestions.problems(case.answer, in_source=True) == []


@pytest.mark.parametrize("message", [
    "set data.on_bad_imag: skip to train without them",  # a misspelled key
    "or set data.on_bad_image: skipp",  # a value that is not one of the choices
    "set train.max_steps: many",  # a value of the wrong type
    "strategy.rnak: unknown key; did you mean 'strategy.rnk'?",  # a closest key that is no key
    "Continue with:\n  finetune train recipe.yaml --continue latest",  # a flag that does not exist
    "Continue with:\n  finetune train recipe.yaml train.max_step=3 --resume latest",  # a misspelled override
    "run `finetune trian recipe.yaml` again",  # no such command
    "run `finetune sample --prompt x`",  # a required option left out
    "Download it (`huggingface-cli download a/b --local-dir DIR`)",  # a program huggingface_hub no longer installs
    "Download it (`hf download a/b --local-folder DIR`)",
    "needs torchao: pip install 'finetune[quantise]'",  # an extra pyproject does not have
    "the site: pip install -e '.[doc]' -c constraints.txt && mkdocs serve",  # the checkout's extra, misspelled
])
def test_the_checker_refuses_a_suggestion_that_would_not_work(message):
    assert suggestions.problems(message) != []


@pytest.mark.parametrize("message", [
    "error: recipe.yaml: 1 problem in the recipe:\n  - data.repeats: must be at least 1, got 0",
    "strategy.rnak: unknown key; did you mean 'strategy.rank'? (valid keys: ...)",  # the user's key, not ours
    "override 'train.max_step=10': value is not valid YAML",
    "set data.on_bad_image: skip to train without them; or model.family: sdxl or auto",
    "a new output_dir:\n  finetune train 'my recipe.yaml' train.learning_rate=1e-05 output_dir=PATH",
    "Download it (`hf download a/b --local-dir DIR`)",
    "needs torchao: pip install torchao (or pip install 'finetune[quantize]')",
    "Fix: pip install -e . -c constraints.txt (or ...)",
    "the site: pip install -e '.[docs]' -c constraints.txt && mkdocs serve",
    "finetune writes no single-file checkpoint; `finetune report` rebuilds it",
])
def test_the_checker_passes_a_suggestion_that_works(message):
    assert suggestions.problems(message) == []


def _run(argv: list[str], capsys) -> tuple[int, str]:
    """finetune's exit code and what it printed to stderr (messages, logs)."""
    capsys.readouterr()
    code = main(argv)
    reset_accelerate()
    return code, capsys.readouterr().err


def _suggested(message: str) -> list[str]:
    """The `finetune train` commands of a message, checked; PATH (a new output_dir) filled in by the caller."""
    assert suggestions.problems(message) == [], message
    return [command for command in suggestions.commands_in(message) if command.startswith("finetune train ")]


def _as_printed(command: str, new_dir: Path | None = None) -> list[str]:
    words = shlex.split(command.replace("output_dir=PATH", f"output_dir={new_dir}") if new_dir else command)
    assert words[0] == "finetune"
    return words[1:]


def test_ctrl_c_stop_message_resumes_as_printed(tiny_base, tmp_path, monkeypatch, capsys, caplog):
    from finetune.training import loop

    ws = Workspace(tmp_path, tiny_base, monkeypatch)
    real_train = loop.train

    def interrupted_at_step_1(recipe, **kwargs):
        return real_train(recipe, on_step=lambda step: step == 1 and os.kill(os.getpid(), signal.SIGINT), **kwargs)

    monkeypatch.setattr(loop, "train", interrupted_at_step_1)
    code, err = _run(ws.train("train.max_steps=3"), capsys)
    assert code == 130 and not (ws.out / ARTIFACT).exists()
    monkeypatch.setattr(loop, "train", real_train)
    [command] = _suggested(err[err.index("stopped on SIGINT"):])
    code, err = _run(_as_printed(command), capsys)
    assert code == 0 and "step-000001 at step 1; step 2 trains" in caplog.text, err
    assert (ws.out / ARTIFACT).is_file()
    assert "wrote:" in caplog.text and suggestions.problems(caplog.text) == []  # the run's log and its file list


def test_output_dir_in_use_offers_three_commands_that_work_as_printed(tiny_base, tmp_path, monkeypatch, capsys,
                                                                       caplog):
    """A run that checkpointed and never finished: continue it, train anew elsewhere, or replace it."""
    ws = Workspace(tmp_path, tiny_base, monkeypatch)
    argv = ws.train("train.max_steps=2", checkpoint={"every": 1})
    ws.run(argv)
    (ws.out / ARTIFACT).unlink()  # as if it had been killed after its last checkpoint
    code, err = _run(argv, capsys)
    assert code == 2 and "already holds checkpoints up to step-000001;" in err
    resume, anew, replace = _suggested(err)
    assert resume.endswith("--resume latest") and anew.endswith("output_dir=PATH") and replace.endswith(
        "--overwrite")

    code, err = _run(_as_printed(resume), capsys)
    assert code == 0 and "step-000001 at step 1; step 2 trains" in caplog.text and (ws.out / ARTIFACT).is_file()
    code, err = _run(_as_printed(anew, tmp_path / "new"), capsys)
    assert code == 0 and (tmp_path / "new" / ARTIFACT).is_file(), err
    before = (ws.out / ARTIFACT).stat().st_mtime_ns
    code, err = _run(_as_printed(replace), capsys)
    assert code == 0 and "--overwrite: removing" in caplog.text and (ws.out / ARTIFACT).stat().st_mtime_ns != before


def test_nothing_to_resume_offers_commands_that_work_as_printed(tiny_base, tmp_path, monkeypatch, capsys):
    """--resume latest on a finished run without checkpoints: the printed commands leave out --resume, which
    cannot go with --overwrite."""
    ws = Workspace(tmp_path, tiny_base, monkeypatch)
    ws.run(ws.train("train.max_steps=1"))
    code, err = _run(ws.train("train.max_steps=1", "--resume", "latest"), capsys)
    assert code == 2 and "nothing to resume" in err
    anew, replace = _suggested(err)
    assert "--resume" not in anew + replace
    code, err = _run(_as_printed(anew, tmp_path / "new"), capsys)
    assert code == 0 and (tmp_path / "new" / ARTIFACT).is_file(), err
    code, err = _run(_as_printed(replace), capsys)
    assert code == 0 and (ws.out / ARTIFACT).is_file(), err


def test_a_refused_resume_offers_new_runs_that_work_as_printed(tiny_base, tmp_path, monkeypatch, capsys):
    """--resume latest with settings that cannot change mid-run (catalogue row resume-another-recipe)."""
    ws = Workspace(tmp_path, tiny_base, monkeypatch)
    code, err = _run(next(c for c in CATALOGUE if c.name == "resume-another-recipe").make(ws), capsys)
    assert code == 2 and "different recipe" in err
    anew, replace = _suggested(err)
    assert "--resume" not in anew + replace
    code, err = _run(_as_printed(anew, tmp_path / "new"), capsys)
    assert code == 0 and (tmp_path / "new" / ARTIFACT).is_file(), err
    code, err = _run(_as_printed(replace), capsys)
    assert code == 0, err


def test_a_damaged_checkpoint_offers_the_good_one_as_printed(tiny_base, tmp_path, monkeypatch, capsys, caplog):
    """Catalogue row checkpoint-without-state: the printed command resumes from the newest good checkpoint."""
    ws = Workspace(tmp_path, tiny_base, monkeypatch)
    code, err = _run(next(c for c in CATALOGUE if c.name == "checkpoint-without-state").make(ws), capsys)
    assert code == 2 and "is damaged" in err
    [resume] = _suggested(err)
    assert resume.endswith("step-000001")
    code, err = _run(_as_printed(resume), capsys)
    assert code == 0 and "step-000001 at step 1; step 2 trains" in caplog.text, err


def test_a_damaged_only_checkpoint_offers_a_new_run_that_works_as_printed(tiny_base, tmp_path, monkeypatch,
                                                                           capsys):
    ws = Workspace(tmp_path, tiny_base, monkeypatch)
    argv = ws.train("train.max_steps=2", checkpoint={"every": 1})
    ws.run(argv)
    (ws.out / "checkpoints" / "step-000001" / "state.json").unlink()
    code, err = _run([*argv, "--resume", "latest"], capsys)
    assert code == 2 and "No good checkpoint is left" in err
    [replace] = _suggested(err)
    code, err = _run(_as_printed(replace), capsys)
    assert code == 0 and (ws.out / "checkpoints" / "step-000001" / "state.json").is_file(), err


def test_validate_notes_the_same_working_commands(tiny_base, tmp_path, monkeypatch, capsys):
    ws = Workspace(tmp_path, tiny_base, monkeypatch)
    ws.run(ws.train("train.max_steps=1"))
    capsys.readouterr()
    assert main(["validate", ws.recipe(), "train.max_steps=1"]) == 0
    printed = capsys.readouterr().out
    assert "note: `finetune train` as it stands will stop" in printed
    assert [c.split()[-1] for c in _suggested(printed)] == ["output_dir=PATH", "--overwrite"]


def test_full_disk_message_resumes_as_printed(tiny_base, tmp_path, monkeypatch, capsys, caplog):
    ws = Workspace(tmp_path, tiny_base, monkeypatch)
    ws.fail_writes(after=1)
    code, err = _run(ws.train("train.max_steps=2", checkpoint={"every": 1}), capsys)
    assert code == 2 and "no room left on the disk" in err
    [command] = _suggested(err[err.rindex("error: "):])
    monkeypatch.undo()  # space freed
    code, err = _run(_as_printed(command), capsys)
    assert code == 0 and "step-000001 at step 1; step 2 trains" in caplog.text and (ws.out / ARTIFACT).is_file()


FIXED_BY_A_SETTING = {case.name: case for case in CATALOGUE if case.name in (
    "truncated-image", "not-an-image", "small-image", "fp16-on-cpu", "placeholder-past-the-window",
    "cache-dir-not-writable")}


@pytest.mark.parametrize("name", FIXED_BY_A_SETTING)
def test_a_suggested_setting_does_what_the_message_says(name, tiny_base, tmp_path, monkeypatch, capsys):
    """The settings a refusal suggests, each added to the refused command as `key=value`, let the run through."""
    ws = Workspace(tmp_path, tiny_base, monkeypatch)
    argv = FIXED_BY_A_SETTING[name].make(ws)
    code, err = _run(argv, capsys)
    assert code == 2
    message = err[err.rindex("error: "):]
    settings = [(key, value) for key, value, suggested in suggestions.settings_in(message) if suggested]
    assert settings and suggestions.problems(message) == [], message
    for index, (key, value) in enumerate(settings):
        code, err = _run([*argv, f"{key}={value}", *(["--overwrite"] if index else [])], capsys)
        assert code == 0, f"{key}={value}: {err[-2000:]}"
