"""Reproducibility: on a CPU, the same recipe and seed give bit-identical files, run after run, for every strategy.

Each recipe trains twice into the same output_dir (the artifact's metadata holds the recipe, output_dir
included, so a second directory would differ for that reason alone); the first run's output is moved aside
before the second starts. Then every file either run wrote is compared byte for byte: weights, headers,
AUTOMATIC1111 pickles, kohya files, DreamBooth's whole pipeline folder, the checkpoint; the report's files record
times, so their history's steps, losses and learning rates are compared instead.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from finetune.recipe.load import parse_recipe
from finetune.training.loop import train
from tests.helpers import (STRATEGIES, files_under, history_of, recipe_dict, reset_accelerate,
                           straight_and_resumed)

# batch_size 2 over 4 images: each step mixes examples, so the data order's seeding matters too
TRAIN = {"max_steps": 3, "batch_size": 2, "seed": 0}


def _train(tiny_base, concept_dir, out: Path, strategy: dict) -> Path:
    # a checkpoint at step 2 of 3: its weights, optimizer state and state.json must repeat as well
    return train(parse_recipe(recipe_dict(tiny_base, concept_dir, out, strategy=strategy, train=TRAIN,
                                          checkpoint={"every": 2})))


@pytest.mark.parametrize("strategy", STRATEGIES.values(), ids=STRATEGIES.keys())
def test_same_recipe_and_seed_write_bit_identical_files(tiny_base, concept_dir, tmp_path, strategy):
    out = tmp_path / "out"
    first_artifact = _train(tiny_base, concept_dir, out, strategy)
    first = files_under(out)
    shutil.move(out, tmp_path / "first")  # the second run starts from nothing, as the first did
    reset_accelerate()  # accelerate's process-wide state as a fresh process would have it
    _train(tiny_base, concept_dir, out, strategy)
    second = files_under(out)

    # the comparison covers the artifact itself (a file, or DreamBooth's folder), not only what lies beside it
    artifact = first_artifact.relative_to(out).as_posix()
    assert any(name == artifact or name.startswith(f"{artifact}/") for name in first), sorted(first)
    assert "checkpoints/step-000002/training_state.pt" in first, sorted(first)
    assert sorted(second) == sorted(first), "the two runs wrote different sets of files"
    differing = [name for name in first if first[name] != second[name]]
    assert not differing, f"these files differ between two runs of the same recipe: {differing}"
    assert len(history_of(out)) == TRAIN["max_steps"] and history_of(out) == history_of(tmp_path / "first")


@pytest.mark.parametrize("strategy", STRATEGIES.values(), ids=STRATEGIES.keys())
def test_a_run_resumed_from_its_checkpoint_writes_the_same_files(tiny_base, concept_dir, tmp_path, strategy):
    out = tmp_path / "out"
    recipe = parse_recipe(recipe_dict(tiny_base, concept_dir, out, strategy=strategy,
                                      train={**TRAIN, "max_steps": 4}, checkpoint={"every": 2}))
    uninterrupted, resumed = straight_and_resumed(recipe, tmp_path / "uninterrupted")
    artifacts = [name for name in uninterrupted if not name.startswith("checkpoints/")]
    assert artifacts, sorted(uninterrupted)
    differing = [name for name in artifacts if resumed.get(name) != uninterrupted[name]]
    assert not differing, f"these files differ between the resumed and the uninterrupted run: {differing}"
    assert history_of(out) == history_of(tmp_path / "uninterrupted") and len(history_of(out)) == 4
