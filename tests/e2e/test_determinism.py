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
from tests.conftest import recipe_dict, reset_accelerate

LORA = {"kind": "lora", "rank": 4, "alpha": 8}
STRATEGIES = {
    "lora": LORA,
    "lora_with_kohya_file": {**LORA, "formats": ["diffusers", "kohya"]},
    # the text encoder trains for its first 2 of 3 steps, so stopping it part-way is covered too
    "dreambooth": {"kind": "dreambooth", "text_encoder": True, "text_encoder_steps": 2},
    # a1111_pt: the pickled .pt is written too, so its bytes are held to the same standard
    "textual_inversion": {"kind": "textual_inversion", "placeholder_token": "<sks>", "initializer_token": "x",
                          "num_vectors": 2, "a1111_pt": True},
    "hypernetwork": {"kind": "hypernetwork", "layer_structure": [1, 2, 1], "activation": "relu", "a1111_pt": True},
}
# batch_size 2 over 4 images: each step mixes examples, so the data order's seeding matters too
TRAIN = {"max_steps": 3, "batch_size": 2, "seed": 0}


# the run's report records wall-clock times and durations, which no two runs share; its history's steps, losses
# and learning rates are compared instead (_history)
REPORT_FILES = {"history.jsonl", "run.json", "report.html"}


def _files(root: Path) -> dict[str, bytes]:
    """Every file under root, by path relative to it, but the report's. Nothing else is excluded: with the
    default recipe (no trackers, so no logs folder; no sample grids) a run writes only what it was asked to, and
    all of it should repeat."""
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*"))
            if path.is_file() and path.relative_to(root).as_posix() not in REPORT_FILES}


def _history(root: Path) -> list[tuple]:
    from finetune.report.history import read_history

    return [(r["step"], r["loss"], r["lr"]) for r in read_history(root)]


def _train(tiny_base, concept_dir, out: Path, strategy: dict) -> Path:
    # a checkpoint at step 2 of 3: its weights, optimizer state and state.json must repeat as well
    return train(parse_recipe(recipe_dict(tiny_base, concept_dir, out, strategy=strategy, train=TRAIN,
                                          checkpoint={"every": 2})))


@pytest.mark.parametrize("strategy", STRATEGIES.values(), ids=STRATEGIES.keys())
def test_same_recipe_and_seed_write_bit_identical_files(tiny_base, concept_dir, tmp_path, strategy):
    out = tmp_path / "out"
    first_artifact = _train(tiny_base, concept_dir, out, strategy)
    first = _files(out)
    shutil.move(out, tmp_path / "first")  # the second run starts from nothing, as the first did
    reset_accelerate()  # accelerate's process-wide state as a fresh process would have it
    _train(tiny_base, concept_dir, out, strategy)
    second = _files(out)

    # the comparison covers the artifact itself (a file, or DreamBooth's folder), not only what lies beside it
    artifact = first_artifact.relative_to(out).as_posix()
    assert any(name == artifact or name.startswith(f"{artifact}/") for name in first), sorted(first)
    assert "checkpoints/step-000002/training_state.pt" in first, sorted(first)
    assert sorted(second) == sorted(first), "the two runs wrote different sets of files"
    differing = [name for name in first if first[name] != second[name]]
    assert not differing, f"these files differ between two runs of the same recipe: {differing}"
    assert len(_history(out)) == TRAIN["max_steps"] and _history(out) == _history(tmp_path / "first")


class _Crash(Exception):
    pass


def _crash_at_step_3(step: int) -> None:
    if step == 3:  # after step 2's checkpoint, before step 3's files: like a kill mid-run
        raise _Crash


@pytest.mark.parametrize("strategy", STRATEGIES.values(), ids=STRATEGIES.keys())
def test_a_run_resumed_from_its_checkpoint_writes_the_same_files(tiny_base, concept_dir, tmp_path, strategy):
    out = tmp_path / "out"
    recipe = parse_recipe(recipe_dict(tiny_base, concept_dir, out, strategy=strategy,
                                      train={**TRAIN, "max_steps": 4}, checkpoint={"every": 2}))
    uninterrupted = _files(train(recipe).parent)
    shutil.move(out, tmp_path / "uninterrupted")
    reset_accelerate()
    with pytest.raises(_Crash):
        train(recipe, on_step=_crash_at_step_3)
    reset_accelerate()
    train(recipe, resume="latest")
    resumed = _files(out)
    artifacts = [name for name in uninterrupted if not name.startswith("checkpoints/")]
    assert artifacts, sorted(uninterrupted)
    differing = [name for name in artifacts if resumed.get(name) != uninterrupted[name]]
    assert not differing, f"these files differ between the resumed and the uninterrupted run: {differing}"
    assert _history(out) == _history(tmp_path / "uninterrupted") and len(_history(out)) == 4
