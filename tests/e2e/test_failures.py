"""Weights that stop being finite are never saved: the run stops at the checkpoint that would have held them,
and the one before stays the latest. (The catalogue in tests/bad_inputs.py covers a NaN loss and a full disk
through the command line.)"""
from __future__ import annotations

import re
import shlex

import pytest
import torch
import yaml
from safetensors.torch import load_file

from finetune.recipe.load import parse_recipe
from finetune.training import loop
from finetune.training.failures import Recovery, TrainingDiverged, check_finite_weights
from tests.helpers import recipe_dict, reset_accelerate


def test_non_finite_weights_name_the_tensors_and_the_missing_checkpoint(tmp_path):
    recovery = Recovery("a lower rate", "finetune train r.yaml --resume latest", "finetune train r.yaml --overwrite")
    check_finite_weights({"a": torch.ones(2), "steps": torch.tensor([3])}, 1, tmp_path, recovery)  # all finite
    with pytest.raises(TrainingDiverged, match=r"(?s)by step 5 \(b\).*There is no checkpoint yet.*Train again from "
                                               r"step 0 with a lower rate:\n  finetune train r.yaml --resume latest$"):
        check_finite_weights({"a": torch.ones(2), "b": torch.tensor([1.0, float("inf")])}, 5, tmp_path, recovery)


def test_a_checkpoint_is_never_written_from_nan_weights(tiny_base, concept_dir, tmp_path, monkeypatch):
    from finetune.models.stable_diffusion import StableDiffusion

    kept = {}
    real_load = StableDiffusion.load

    def load_keeping_parts(self, *args, **kwargs):
        kept["parts"] = real_load(self, *args, **kwargs)
        return kept["parts"]

    def poison_after_step_2(step):
        if step == 2:  # as an fp16 overflow would: the loss of step 2 was finite, the weights after it are not
            with torch.no_grad():
                for parameter in kept["parts"].unet.parameters():
                    if parameter.requires_grad:
                        parameter.fill_(float("nan"))

    monkeypatch.setattr(StableDiffusion, "load", load_keeping_parts)
    out = tmp_path / "out"
    recipe = parse_recipe(recipe_dict(tiny_base, concept_dir, out, checkpoint={"every": 1}))
    with pytest.raises(TrainingDiverged, match=r"became NaN or infinite by step 2 .*step-000001, is kept"):
        loop.train(recipe, on_step=poison_after_step_2)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001"]
    assert not (out / "pytorch_lora_weights.safetensors").exists()


def _printed_commands(text: str) -> list[list[str]]:
    """The commands a message prints on their own indented lines, split as a shell would."""
    return [shlex.split(line) for line in text.splitlines() if line.startswith("  finetune ")]


def test_the_commands_a_nan_suggests_run_as_printed(tiny_base, concept_dir, tmp_path, capsys):
    from finetune.cli import main
    from finetune.report.history import read_history

    out = tmp_path / "out"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(tiny_base, concept_dir, out, train={"max_steps": 6},
                                               checkpoint={"every": 1})))
    # the command line sets the rate that diverges: the suggestion must replace it, not add a second one
    assert main(["train", str(path), "train.learning_rate=10", "train.max_grad_norm=0"]) == 2
    reset_accelerate()
    message = capsys.readouterr().err
    kept = re.search(r"training diverged.*The last good checkpoint, .*step-(\d+), is kept", message)
    assert kept, message[-3000:]
    resumed_at = int(kept.group(1))
    resume, restart = _printed_commands(message)
    assert resume[:3] == ["finetune", "train", str(path)] and resume[-2:] == ["--resume", "latest"]
    assert "train.learning_rate=1.0" in resume and "train.max_grad_norm=1.0" in resume
    assert "train.learning_rate=10" not in resume and "train.max_grad_norm=0" not in resume

    # run exactly what was printed: the resume is accepted and says what the new rate does
    code = main(resume[1:])
    reset_accelerate()
    said = capsys.readouterr()
    assert "different recipe" not in said.err and f"step-{resumed_at:06d} at step {resumed_at}" in said.out
    assert "resume: train.learning_rate: 10.0 in the checkpoint's run, 1.0 now" in said.out
    rates = {row["step"]: row["lr"] for row in read_history(out)}
    assert rates[1] == 10.0 and rates[resumed_at + 1] == 1.0  # the resumed step trained at the new rate
    if code != 0:  # the checkpoint itself was too far gone: the same step diverges again, as the message warns
        assert "If it diverges again from there" in said.err

    code = main(restart[1:])  # the other printed command: again from step 0 at the new rate
    said = capsys.readouterr()
    assert code == 0, said.err[-2000:]
    assert "--overwrite: removing the earlier run's" in said.out
    assert [row["lr"] for row in read_history(out)] == [1.0] * 6
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
