"""Ctrl-C (SIGINT) and `kill` (SIGTERM) stop a run at the next step boundary with a checkpoint, say how to go on,
and the resumed run ends with the same artifact as an uninterrupted one (issue 9)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch
import yaml
from safetensors.torch import load_file

from finetune.recipe.load import parse_recipe
from finetune.training.interrupt import Interrupted
from finetune.training.loop import train
from tests.helpers import PER_STEP, recipe_dict, start_training, wait_for_progress

RUN = {"max_steps": 5, "learning_rate": 1e-3, "batch_size": 2, "lr_scheduler": "linear"}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_checkpoints_at_the_step_boundary_and_resume_is_exact(signum, tiny_base, concept_dir, tmp_path):
    full = parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "full", train=RUN, checkpoint={"every": 0}))
    uninterrupted = load_file(train(full))

    part = parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "part", train=RUN, checkpoint={"every": 0}))

    def signal_at_step_2(step: int) -> None:
        if step == 2:
            os.kill(os.getpid(), signum)  # arrives mid-run; the loop must finish the step first

    # what the process had (Python's default_int_handler; SIG_IGN where a shell started it in the background)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as info:
        train(part, on_step=signal_at_step_2)
    assert info.value.exit_code == 128 + signum
    assert "after step 2 of 5" in str(info.value) and "--resume latest" in str(info.value)
    assert [p.name for p in (tmp_path / "part" / "checkpoints").iterdir()] == ["step-000002"]
    assert not (tmp_path / "part" / "pytorch_lora_weights.safetensors").exists()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # given back

    resumed = load_file(train(part, resume="latest"))
    assert resumed.keys() == uninterrupted.keys()
    for key in uninterrupted:
        assert torch.equal(resumed[key], uninterrupted[key]), key


def test_a_stop_draws_no_grid_and_saves_no_snapshot_at_its_step(tiny_base, concept_dir, tmp_path):
    # a sample grid can take longer than the step itself: asked to stop, the run writes its checkpoint and goes
    out = tmp_path / "out"
    recipe = parse_recipe(recipe_dict(tiny_base, concept_dir, out, train=RUN,
                                      checkpoint={"every": 0, "snapshot_every": 2},
                                      sample={"every": 2, "prompts": ["a purple sks"], "steps": 2}))

    def signal_at_step_2(step: int) -> None:
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        train(recipe, on_step=signal_at_step_2)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]
    assert not (out / "samples").exists() and not (out / "snapshots").exists()
    assert [json.loads(line)["step"] for line in (out / "history.jsonl").read_text().splitlines()] == [1, 2]


def test_ctrl_c_on_the_command_line(tiny_base, concept_dir, tmp_path):
    recipe = recipe_dict(tiny_base, concept_dir, tmp_path / "out", train={"max_steps": 100000},
                         checkpoint={"every": 0})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1", **PER_STEP}
    process = subprocess.Popen([sys.executable, "-m", "finetune", "train", str(path)], stderr=subprocess.PIPE,
                               text=True, env=env)
    lines: list[str] = []
    started = threading.Event()

    def read() -> None:
        for chunk in iter(lambda: process.stderr.read(64), ""):
            lines.append(chunk)
            if " 1/100000" in "".join(lines):  # tqdm shows the first finished step
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert started.wait(timeout=300), "".join(lines)[-2000:]
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130
    reader.join(timeout=10)
    text = "".join(lines)
    assert "stopping after this step" in text and f"finetune train {path} --resume latest" in text
    saved = list((tmp_path / "out" / "checkpoints").iterdir())
    assert len(saved) == 1 and (saved[0] / "state.json").is_file()


def test_kill_9_at_any_moment_then_resume_gives_the_uninterrupted_artifact(tiny_base, concept_dir, tmp_path):
    run = {"max_steps": 8, "learning_rate": 1e-3, "batch_size": 2}
    # the uninterrupted run in a process like the killed ones (the thread count changes float sums' order)
    full = tmp_path / "full.yaml"
    full.write_text(yaml.safe_dump(recipe_dict(tiny_base, concept_dir, tmp_path / "full", train=run)))
    process = start_training(full)
    process.communicate(timeout=300)
    uninterrupted = load_file(tmp_path / "full" / "pytorch_lora_weights.safetensors")

    # a checkpoint every step, so kills land before, inside and after checkpoint writes and the final save
    recipe = recipe_dict(tiny_base, concept_dir, tmp_path / "killed", train=run, checkpoint={"every": 1, "keep": 2})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    artifact = tmp_path / "killed" / "pytorch_lora_weights.safetensors"
    kills = 0
    for step_seen, delay in ((1, 0.0), (3, 0.05), (5, 0.2), (6, 0.4)):
        process = start_training(path, "--resume", "latest")
        if wait_for_progress(process, f" {step_seen}/8"):
            threading.Event().wait(delay)
            process.kill()  # SIGKILL: no handler, no cleanup
            kills += 1
        process.wait(timeout=120)
    assert kills >= 2
    process = start_training(path, "--resume", "latest")
    process.communicate(timeout=300)
    assert process.returncode == 0
    resumed = load_file(artifact)
    assert resumed.keys() == uninterrupted.keys()
    for key in uninterrupted:
        assert torch.equal(resumed[key], uninterrupted[key]), key
    assert not list((tmp_path / "killed").glob(".*tmp*"))  # the finished run left no temporary file behind
