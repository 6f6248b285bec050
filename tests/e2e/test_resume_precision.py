"""`train.mixed_precision` may change on resume (issue 32): the way out of a run that one precision stopped
(bf16 sample grids once crashed on "Input type (float) and bias type (c10::BFloat16)"; fp16 may overflow) is to
continue it in another, and the resume command with the precision changed does continue it, saying what that
changes."""
from __future__ import annotations

import shlex

import pytest
import yaml

from finetune.cli import main
from finetune.training import loop
from finetune.training.resume import recipe_changes, resume_command
from tests.helpers import recipe_dict, reset_accelerate


def test_a_change_of_precision_is_a_note_not_a_refusal():
    notes, refusals = recipe_changes({"train": {"mixed_precision": "bf16"}}, {"train": {"mixed_precision": "no"}})
    assert refusals == []
    assert notes == ["train.mixed_precision: 'bf16' in the checkpoint's run, 'no' now: the base computes with mixed "
                     "precision no instead of bf16 from this step on (with model.dtype auto it also loads in that "
                     "precision); the trained weights and the optimizer's state are fp32 either way, so they carry on, but the result is "
                     "not bit-identical to an uninterrupted run in either precision"]


def test_a_run_stopped_in_bf16_continues_without_mixed_precision(tiny_base, concept_dir, tmp_path, monkeypatch,
                                                                  capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(
        tiny_base, concept_dir, tmp_path / "out", train={"max_steps": 3, "mixed_precision": "bf16"},
        checkpoint={"every": 1}, sample={"every": 2, "prompts": ["a purple sks"], "steps": 1})))
    real_save_samples = loop.saves.save_samples

    def crash(*args, **kwargs):  # what the first bf16 grid did before issue 32
        raise RuntimeError("Input type (float) and bias type (c10::BFloat16) should be the same")
    monkeypatch.setattr(loop.saves, "save_samples", crash)
    with pytest.raises(RuntimeError, match="BFloat16"):
        main(["train", str(path)])
    assert (tmp_path / "out" / "checkpoints" / "step-000002").is_dir()
    monkeypatch.setattr(loop.saves, "save_samples", real_save_samples)
    reset_accelerate()  # a new process, as the user's next command is
    capsys.readouterr()

    # the command that continues the run, with the precision changed on it, run as a shell would split it
    words = shlex.split(resume_command(str(path), ["train.mixed_precision=no"]))
    assert words[:2] == ["finetune", "train"]
    assert main(words[1:]) == 0
    out = capsys.readouterr().out
    assert ("resume: train.mixed_precision: 'bf16' in the checkpoint's run, 'no' now: the base computes with "
            "mixed precision no") in out
    assert "resumed from" in out and "at step 2" in out
    assert "mixed precision no, frozen base in float32" in out
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
