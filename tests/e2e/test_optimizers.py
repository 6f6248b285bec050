"""Every optimizer train.optimizer names, through the whole run: a run stopped after its checkpoint and resumed
writes the same artifact as the uninterrupted one (a new optimizer in optimizers.REGISTRY is covered by adding it),
and schedule-free AdamW saves its averaged weights without a sample grid changing what trains."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from safetensors.torch import load_file

from finetune.recipe.load import parse_recipe
from finetune.training import optimizers
from finetune.training.loop import train
from tests.helpers import history_of, recipe_dict, reset_accelerate, straight_and_resumed

# a rate that suits each: Prodigy's multiplies the step size it finds itself
RATES = {"prodigy": 1.0, "lion": 1e-4}
ARTIFACT = "pytorch_lora_weights.safetensors"


def _available(name: str) -> bool:
    return importlib.util.find_spec(optimizers.REGISTRY[name].module.split(".")[0]) is not None


EACH = [pytest.param(name, marks=pytest.mark.skipif(not _available(name), reason=f"{name}'s package is not here"))
        for name in optimizers.REGISTRY]


def _recipe(tiny_base, concept_dir, out, name: str, **sections):
    train_options = {"max_steps": 4, "batch_size": 2, "seed": 0, "optimizer": name,
                     "learning_rate": RATES.get(name, 1e-3)}
    sections.setdefault("checkpoint", {"every": 2})
    return parse_recipe(recipe_dict(tiny_base, concept_dir, out, train=train_options, **sections))


@pytest.mark.parametrize("name", EACH)
def test_a_run_resumed_with_each_optimizer_writes_the_same_artifact(tiny_base, concept_dir, tmp_path, name):
    out = tmp_path / "out"
    recipe = _recipe(tiny_base, concept_dir, out, name)
    uninterrupted, resumed = straight_and_resumed(recipe, tmp_path / "uninterrupted")
    assert resumed[ARTIFACT] == uninterrupted[ARTIFACT]
    assert history_of(out) == history_of(tmp_path / "uninterrupted")
    losses = [loss for _, loss, _ in history_of(out)]
    assert len(losses) == 4 and all(loss == loss for loss in losses)  # finite: not NaN


def test_schedule_free_saves_its_averaged_point_and_a_grid_changes_nothing_that_trains(tiny_base, concept_dir,
                                                                                        tmp_path, capsys):
    plain = train(_recipe(tiny_base, concept_dir, tmp_path / "plain", "schedule_free_adamw"))
    assert "optimizer: schedule_free_adamw (schedulefree.AdamWScheduleFree): rate 0.001, no schedule" in (
        capsys.readouterr().out)
    reset_accelerate()
    # a sample grid and a snapshot at step 2, after the checkpoint: both through the averaged view
    with_grid = train(_recipe(tiny_base, concept_dir, tmp_path / "grid", "schedule_free_adamw",
                              sample={"every": 2, "prompts": ["a purple sks"], "steps": 1},
                              checkpoint={"every": 2, "snapshot_every": 2}))
    assert _equal(load_file(with_grid), load_file(plain))
    assert history_of(tmp_path / "grid") == history_of(tmp_path / "plain")
    # the checkpoint holds the point it steps from (y), the snapshot the averaged one (x): not the same weights
    stepped = load_file(tmp_path / "grid" / "checkpoints" / "step-000002" / "trainable.safetensors")
    shown = load_file(tmp_path / "grid" / "snapshots" / "step-000002" / ARTIFACT)
    assert len(stepped) == len(shown) and _total(stepped) != pytest.approx(_total(shown), rel=1e-6)


def _equal(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def _total(tensors: dict) -> float:
    """The sum of every weight's magnitude: the checkpoint's and the artifact's keys are named differently (peft's
    state vs. diffusers' file), the weights are the same tensors."""
    return float(sum(tensor.double().abs().sum() for tensor in tensors.values()))
