"""The learning rate logged for step N is the one step N's optimizer.step() used (history.jsonl, the trackers,
the progress bar), a warmup's first step trains (step N of the warmup at N / warmup of the rate), and a resume
with a new rate puts it into the optimizer, not the rate restored from the checkpoint (issue 32, items 3-4)."""
from __future__ import annotations

import math
import shutil

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from safetensors.torch import load_file

from finetune.recipe.load import parse_recipe
from finetune.training.loop import train
from tests.helpers import Crash, crash_at_step_3, files_under, history_of, recipe_dict, reset_accelerate

RATE = 1e-3
WARMUP = {"max_steps": 4, "learning_rate": RATE, "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 3}


@pytest.fixture
def used_rates(monkeypatch):
    """The rate of every optimizer.step() call (each param group's), in order: what the weights really moved by."""
    from accelerate import Accelerator

    calls: list[list[float]] = []
    handle = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: calls.append([float(g["lr"]) for g in optimizer.param_groups]))
    logged: list[tuple[int, float]] = []
    real_log = Accelerator.log
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None, log_kwargs=None: (
        logged.append((step, values["lr"])), real_log(self, values, step=step)))
    yield calls, logged
    handle.remove()


def _recipe(tiny_base, concept_dir, out, **train_options):
    return parse_recipe(recipe_dict(tiny_base, concept_dir, out, train={**WARMUP, **train_options},
                                    checkpoint={"every": 2}))


def test_logged_rate_is_the_rate_each_step_trained_at(tiny_base, concept_dir, tmp_path, used_rates):
    calls, logged = used_rates
    train(_recipe(tiny_base, concept_dir, tmp_path / "out"))
    history = [(step, lr) for step, _, lr in history_of(tmp_path / "out")]
    # the warmup counts from 1: step 1 trains at a third of the rate, step 3 (the last warmup step) at all of it
    assert [lr for _, lr in history] == pytest.approx([RATE / 3, 2 * RATE / 3, RATE, RATE], rel=1e-12)
    assert [lr for (lr,) in calls] == [lr for _, lr in history]  # exactly what each optimizer.step() used
    assert logged == history  # the trackers (TensorBoard, W&B) get the same


def test_a_one_step_run_with_one_warmup_step_trains(tiny_base, concept_dir, tmp_path, used_rates):
    calls, _ = used_rates
    artifact = train(_recipe(tiny_base, concept_dir, tmp_path / "out", max_steps=1, lr_warmup_steps=1))
    # LoRA's up (B) weights start at zero: non-zero means the one step moved them
    ups = [tensor for name, tensor in load_file(artifact).items() if "lora_B" in name or "lora_up" in name]
    assert ups and max(float(t.abs().max()) for t in ups) > 0
    assert calls == [[RATE]] and history_of(tmp_path / "out")[0][2] == RATE


def test_a_schedule_without_warmup_still_starts_at_the_full_rate(tiny_base, concept_dir, tmp_path, used_rates):
    calls, _ = used_rates
    train(_recipe(tiny_base, concept_dir, tmp_path / "out", max_steps=3, lr_scheduler="cosine", lr_warmup_steps=0))
    # diffusers' cosine over 3 steps: factors cos at 0, 1/3, 2/3 of the half period; the last step is not wasted at 0
    expected = [RATE * 0.5 * (1 + math.cos(math.pi * i / 3)) for i in range(3)]
    assert [lr for (lr,) in calls] == pytest.approx(expected, rel=1e-12)
    assert [lr for _, _, lr in history_of(tmp_path / "out")] == [lr for (lr,) in calls]


def test_a_run_resumed_inside_the_warmup_is_bit_exact(tiny_base, concept_dir, tmp_path):
    recipe = _recipe(tiny_base, concept_dir, tmp_path / "out")
    uninterrupted = files_under(train(recipe).parent)
    shutil.move(tmp_path / "out", tmp_path / "uninterrupted")
    reset_accelerate()
    with pytest.raises(Crash):
        train(recipe, on_step=crash_at_step_3)  # after step 2's checkpoint, inside the 3-step warmup
    reset_accelerate()
    train(recipe, resume="latest")
    resumed = files_under(tmp_path / "out")
    assert resumed["pytorch_lora_weights.safetensors"] == uninterrupted["pytorch_lora_weights.safetensors"]
    assert history_of(tmp_path / "out") == history_of(tmp_path / "uninterrupted")


def test_a_resume_with_a_new_rate_trains_at_it(tiny_base, concept_dir, tmp_path, used_rates, capsys):
    calls, _ = used_rates
    warmup = {"lr_warmup_steps": 4}
    with pytest.raises(Crash):  # after step 2's checkpoint
        train(_recipe(tiny_base, concept_dir, tmp_path / "out", **warmup), on_step=crash_at_step_3)
    reset_accelerate()
    del calls[:]
    # a doubled rate: steps 3 and 4 go on with the warmup at the new rate, not at the checkpoint's
    train(_recipe(tiny_base, concept_dir, tmp_path / "out", learning_rate=2 * RATE, **warmup), resume="latest")
    assert [lr for (lr,) in calls] == pytest.approx([3 / 4 * 2 * RATE, 2 * RATE], rel=1e-12)
    assert [lr for _, _, lr in history_of(tmp_path / "out")] == pytest.approx(
        [RATE / 4, RATE / 2, 3 / 4 * 2 * RATE, 2 * RATE], rel=1e-12)
    out = capsys.readouterr().out
    assert ("resume: train.learning_rate: 0.001 in the checkpoint's run, 0.002 now: the optimizer's param groups "
            "and the schedule's base rates take 0.002 from the resumed step on") in out
    assert "at step 2; step 3 trains at learning rate 0.0015" in out
