"""Every command in README.md and docs/ works as written (issue 39, item 5): the blocks marked `<!-- runnable -->`
are run on the shipped tiny shapes-world models; every other `finetune ...` command is parsed by finetune's own
argparse, its overrides checked against the recipe schema (tests/docs/commands.py says how a page is read). A
renamed flag, key, command or recipe file so fails here, not in a reader's terminal."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.docs import commands
from tests.docs.commands import ROOT, Block

TIMEOUT_S = 120  # a runnable block is a quick look on a CPU (seconds to a minute), never a real run
MAX_RUNNABLE_BLOCKS = 10  # the brief's bound: this file stays a quick test
LINKED = ("recipes", "data_examples")  # what a runnable block may name by a relative path, as in a checkout
OUTPUT_TAIL = 6000  # characters of a failed block's output shown: its error and what led to it

BLOCKS = [block for page in commands.pages() for block in
          commands.shell_blocks(page.read_text(encoding="utf-8"), str(page.relative_to(ROOT)))]
RUNNABLE = [block for block in BLOCKS if block.runnable]
PARSED = [command for block in BLOCKS if not block.runnable for command in commands.commands_of(block)]


def _ids(items) -> list[str]:
    """page:line for each item; a second command on the same line gets "#2"."""
    seen: dict[str, int] = {}
    ids = []
    for item in items:
        seen[item.where] = seen.get(item.where, 0) + 1
        ids.append(item.where if seen[item.where] == 1 else f"{item.where}#{seen[item.where]}")
    return ids


def scratch(folder: Path) -> tuple[Path, dict[str, str]]:
    """A working directory as a reader's checkout looks to a block (recipes/ and data_examples/ linked) and the
    environment it runs in: offline, with `finetune` on PATH as this interpreter's `-m finetune` (a PYTHONPATH
    checkout has no console script), `python` this interpreter."""
    work, bin_dir = folder / "work", folder / "bin"
    work.mkdir()
    bin_dir.mkdir()
    for name in LINKED:
        (work / name).symlink_to(ROOT / name, target_is_directory=True)
    wrapper = bin_dir / "finetune"
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m finetune "$@"\n')
    wrapper.chmod(0o755)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return work, env


def run_block(block: Block, folder: Path, timeout: float = TIMEOUT_S) -> str | None:
    """None when the block succeeds; otherwise what failed: its page and line, its text and its output. bash -x
    shows which of the block's commands failed; -euo pipefail stops at the first that fails."""
    work, env = scratch(folder)
    process = subprocess.Popen(["bash", "-xeuo", "pipefail", "-c", block.text], cwd=work, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
        if process.returncode == 0:
            return None
        outcome = f"exit code {process.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the block's own session: its finetune processes too
        output, _ = process.communicate()
        outcome = f"still running after {timeout:g} s, stopped"
    return (f"{block.where}: the runnable block failed ({outcome})\n--- block\n{block.text}"
            f"--- output (its last {OUTPUT_TAIL} characters)\n{output[-OUTPUT_TAIL:]}")


@pytest.mark.parametrize("block", RUNNABLE, ids=_ids(RUNNABLE))
def test_runnable_block_runs(block, tmp_path):
    failure = run_block(block, tmp_path)
    assert failure is None, failure


@pytest.mark.parametrize("command", PARSED, ids=_ids(PARSED))
def test_command_parses_with_keys_the_schema_has(command):
    found = commands.problems(command.argv, command.words)
    assert found == [], f"{command.where}: {command.text}\n" + "\n".join(f"    {p}" for p in found)


@pytest.mark.parametrize("page", commands.pages(), ids=lambda page: str(page.relative_to(ROOT)))
def test_every_runnable_marker_is_right_above_a_shell_block(page):
    """A marker with a blank line, or another fence, under it would leave its block unrun without a word."""
    assert commands.dangling_markers(page.read_text(encoding="utf-8")) == []


def test_runnable_blocks_are_few():
    # and some: with none found (a renamed marker, a page reader that finds no block), the two tests above would
    # collect no case and pass, checking nothing
    assert RUNNABLE and PARSED, "no runnable block or no parsed finetune command found in README.md and docs/"
    assert len(RUNNABLE) <= MAX_RUNNABLE_BLOCKS, (
        f"{len(RUNNABLE)} runnable blocks ({', '.join(b.where for b in RUNNABLE)}): the docs test runs each on "
        f"every test run; mark only the quick looks a reader copies first")


# the checks themselves, on pages written here

FAKE_PAGE = """# Training

```bash
finetune train recipes/shapes/lora_new_object.yaml train.max_steps=2 --resume latest
finetune train recipes/shapes/lora_new_object.yaml --continue latest
finetune validate recipes/shapes/lora_new_object.yaml train.max_step=3
```
"""


def test_a_renamed_flag_and_a_renamed_key_are_both_reported():
    found = commands.page_problems(FAKE_PAGE, "docs/fake.md")
    assert len(found) == 2, found
    flag, key = found
    assert flag.startswith("docs/fake.md:5: finetune train") and "unrecognized arguments: --continue" in flag
    assert key.startswith("docs/fake.md:6: finetune validate") and "train.max_step: no such key" in key


@pytest.mark.parametrize("line, problem", [
    ("finetune trian recipes/sd15_lora.yaml", "invalid choice: 'trian'"),
    ("finetune sample --prompt x --out grid.png", "the following arguments are required: --base"),
    ("finetune train recipes/sd15_lora.yaml train.max_steps=many", "train.max_steps: 'many' is refused"),
    ("finetune train recipes/sd15_lora.yaml max_steps", "'max_steps' is not key=value"),
    ("finetune train recipes/no_such_recipe.yaml", "recipes/no_such_recipe.yaml: no such file"),
    ("accelerate launch --config_file recipes/accelerate/none.yaml -m finetune train R.yaml",
     "recipes/accelerate/none.yaml: no such file"),
    ("finetune demo [--max-steps N] [--fast]", "unrecognized arguments: --fast"),
    ("pip install -e . && finetune eval --concept star --jsn m.json", "unrecognized arguments: --jsn"),
])
def test_a_command_that_would_not_work_is_reported(line, problem):
    found = commands.page_problems(f"```sh\n{line}\n```\n", "README.md")
    assert len(found) == 1 and problem in found[0], found


@pytest.mark.parametrize("line", [
    "finetune train RECIPE.yaml [key=value ...]   # e.g. train.max_steps=200",
    "finetune demo [--out DIR] [--strategies lora] [--max-steps N] --base transformer",
    "finetune train <recipe> strategy.rank=<rank> --resume latest",
    "finetune train recipes/sd15_lora.yaml 'strategy.target_modules=[to_q, to_v]' output_dir=runs/x",
    "HF_HUB_OFFLINE=1 python -m finetune validate recipes/shapes/lora_new_object.yaml --decode 2>&1 | tee log",
    "torchrun --nproc_per_node 2 -m finetune train RECIPE.yaml",
    "finetune resize IN OUT --rank N [--json report.json] && finetune inspect OUT --json > info.json",
    "finetune --help; finetune train --help; finetune --version",
    "python -m finetune.models.tiny outputs/tiny-sdxl --family sdxl  # another program: not parsed as finetune",
])
def test_a_command_that_works_as_written_passes(line):
    assert commands.page_problems(f"```bash\n{line}\n```\n", "README.md") == []


def test_blocks_are_read_as_a_shell_reads_them():
    page = ("Intro\n\n<!-- runnable -->\n```bash\nfinetune validate recipes/shapes/lora_new_object.yaml\n```\n\n"
            "1. A list item:\n\n    ```shell\n    finetune merge --base B \\\n        --lora a.safetensors:0.8 "
            "--out m/   # a comment, --not-a-flag\n    ```\n\n```python\nfinetune = 1\n```\n")
    runnable, indented = commands.shell_blocks(page, "docs/x.md")
    assert (runnable.where, runnable.runnable) == ("docs/x.md:4", True)
    assert (indented.where, indented.runnable) == ("docs/x.md:10", False)
    [command] = commands.commands_of(indented)
    assert command.line == 11 and command.argv == ["merge", "--base", "B", "--lora", "a.safetensors:0.8",
                                                  "--out", "m/"]
    assert commands.page_problems(page, "docs/x.md") == []  # the runnable block is run, not parsed


def test_a_marker_that_marks_no_shell_block_is_found():
    page = "<!-- runnable -->\n\n```bash\nls\n```\n<!-- runnable -->\n```python\nx = 1\n```\n<!-- runnable -->"
    assert commands.dangling_markers(page) == [1, 6, 10]


def test_run_block_passes_a_working_block_with_the_readers_checkout(tmp_path):
    block = Block("docs/x.md", 7, "test -f recipes/shapes/lora_new_object.yaml\nfinetune --version\n"
                                  "python -m finetune --version | grep -q finetune\n", True)
    assert run_block(block, tmp_path) is None


def test_run_block_shows_where_what_and_why_a_block_failed(tmp_path):
    failure = run_block(Block("docs/x.md", 7, "echo first\nfinetune trian x\necho never\n", True), tmp_path)
    assert failure.startswith("docs/x.md:7: the runnable block failed (exit code 2)")
    shown, output = failure.split("--- output")
    assert "finetune trian x" in shown and "invalid choice: 'trian'" in output and "never\n" not in output


def test_run_block_stops_a_block_that_runs_too_long(tmp_path):
    failure = run_block(Block("docs/x.md", 3, "sleep 30\n", True), tmp_path, timeout=1)
    assert "still running after 1 s, stopped" in failure
