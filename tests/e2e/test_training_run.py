"""What a training run leaves behind: checkpoints that resume exactly, samples, logs."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from finetune.recipe.load import parse_recipe
from finetune.training import checkpoint
from finetune.training.loop import train
from tests.helpers import recipe_dict

RUN = {"max_steps": 6, "learning_rate": 1e-3, "batch_size": 2, "gradient_accumulation_steps": 2,
       "lr_scheduler": "linear", "lr_warmup_steps": 1}


def test_resume_continues_at_the_exact_step(tiny_base, concept_dir, tmp_path):
    data = {"random_flip": True, "crop": "random", "caption_dropout": 0.3, "resolution": 32}
    strategy = {"kind": "lora", "rank": 4, "dropout": 0.1, "text_encoder": True}
    full = parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "full", train=RUN, data=data,
                                    strategy=strategy, checkpoint={"every": 0}))
    uninterrupted = load_file(train(full))

    part = parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "part", train=RUN, data=data,
                                    strategy=strategy, checkpoint={"every": 2, "keep": 2}))
    train(part)
    saved = sorted(p.name for p in (tmp_path / "part" / "checkpoints").iterdir())
    assert saved == ["step-000002", "step-000004"]  # every 2 steps; none at the final step 6
    # simulate an interruption after step 2: drop the later checkpoint and the final artifact
    import shutil

    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step-000004")
    (tmp_path / "part" / "pytorch_lora_weights.safetensors").unlink()
    state = json.loads((tmp_path / "part" / "checkpoints" / "step-000002" / "state.json").read_text())
    assert state["step"] == 2
    resumed = load_file(train(part, resume="latest"))
    assert uninterrupted.keys() == resumed.keys()
    for key in uninterrupted:
        assert torch.equal(uninterrupted[key], resumed[key]), key


def test_checkpoints_keep_only_the_newest(tiny_base, concept_dir, tmp_path):
    recipe = parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "out", train={"max_steps": 7},
                                      checkpoint={"every": 2, "keep": 2}))
    train(recipe)
    names = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    assert names == ["step-000004", "step-000006"]
    assert checkpoint.find_checkpoint(tmp_path / "out", "latest").name == "step-000006"


def test_resume_refuses_another_recipes_checkpoint(tiny_base, concept_dir, tmp_path):
    recipe = parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "out", train={"max_steps": 4},
                                      checkpoint={"every": 2}))
    train(recipe)
    other = parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "out", train={"max_steps": 4},
                                     strategy={"kind": "lora", "rank": 8}))
    with pytest.raises(checkpoint.CheckpointError, match="strategy.rank"):
        train(other, resume="latest")



def test_resume_latest_without_a_checkpoint_starts_at_step_0(tiny_base, concept_dir, tmp_path, capsys):
    # a run killed before its first checkpoint: the same command still finishes it, as a fresh run would
    plain = parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "plain", train={"max_steps": 2}))
    fresh = parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "empty", train={"max_steps": 2}))
    (tmp_path / "empty" / "checkpoints" / ".tmp-step-000001").mkdir(parents=True)  # a save that died midway
    expected = load_file(train(plain))
    resumed = load_file(train(fresh, resume="latest"))
    assert "no checkpoint in" in capsys.readouterr().out
    assert all(torch.equal(expected[key], resumed[key]) for key in expected)


def test_an_unfinished_checkpoint_is_never_latest_and_a_damaged_one_is_named(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step-000002").mkdir(parents=True)
    (root / "step-000002" / "state.json").write_text("{}")
    (root / ".tmp-step-000004").mkdir()  # a save that died midway, named as before finetune.io.atomic
    (root / ".step-000005.tmp-4242").mkdir()  # and as since
    assert checkpoint.find_checkpoint(tmp_path, "latest").name == "step-000002"
    # a save renames only whole folders, so a step folder without state.json was damaged since: resuming
    # names it (tests/cli/test_file_errors.py) instead of going back to step 2 without a word
    (root / "step-000006").mkdir()
    assert checkpoint.find_checkpoint(tmp_path, "latest").name == "step-000006"
    with pytest.raises(checkpoint.DamagedCheckpoint, match="step-000006 is damaged: it has no state.json"):
        checkpoint.load_checkpoint(root / "step-000006")


def test_samples_and_tensorboard_and_wandb_offline(tiny_base, concept_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    recipe = parse_recipe(recipe_dict(
        tiny_base, concept_dir, tmp_path / "out", train={"max_steps": 4},
        sample={"every": 2, "prompts": ["a purple sks", "a red circle"], "steps": 2, "images_per_prompt": 2},
        log={"to": ["tensorboard", "wandb"], "project": "unit"}))
    train(recipe)
    from PIL import Image

    grids = sorted((tmp_path / "out" / "samples").glob("*.png"))
    assert [g.name for g in grids] == ["step-000002.png", "step-000004.png"]
    assert Image.open(grids[0]).size == (2 * 32, 2 * 32)  # images_per_prompt columns, one row per prompt
    events = list((tmp_path / "out" / "logs").rglob("events.out.tfevents*"))
    assert events and sum(e.stat().st_size for e in events) > 200
    assert list((tmp_path / "out" / "logs").rglob("offline-run-*"))  # the W&B offline run folder


def test_resume_removes_what_a_killed_run_left_half_written(tiny_base, concept_dir, tmp_path):
    out = tmp_path / "out"
    leftovers = [out / ".pytorch_lora_weights.safetensors.tmp-4242", out / "kohya" / ".out.safetensors.tmp-4242",
                 out / "checkpoints" / ".tmp-step-000003"]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir() if path.name.startswith(".tmp-step") else path.write_bytes(b"half")
    train(parse_recipe(recipe_dict(tiny_base, concept_dir, out, train={"max_steps": 1})), resume="latest")
    assert not any(path.exists() for path in leftovers)
    assert (out / "pytorch_lora_weights.safetensors").is_file()
