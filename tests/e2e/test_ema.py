"""train.ema on the tiny base: the artifact, snapshots and sample grids hold the average of the trained weights, the
trained weights are saved beside it in raw/ (the very weights of a run without EMA), the header says which is
which, the summary and report say EMA is on, and a resumed run writes the same files, for every strategy."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from finetune.recipe.load import parse_recipe
from finetune.training import saves
from finetune.training.loop import train
from finetune.strategies import create_strategy
from tests.helpers import STRATEGIES, recipe_dict, reset_accelerate, straight_and_resumed

DECAY = 0.5  # a short horizon, so that 4 steps' average differs clearly from the last weights
LORA_FILE = "pytorch_lora_weights.safetensors"


def _header(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_the_artifact_is_the_average_and_raw_holds_the_trained_weights(tiny_base, concept_dir, tmp_path,
                                                                       monkeypatch, capsys):
    # what the trained modules hold when the last grid is drawn, and when the final artifact is written (the
    # file itself may fold LoRA's alpha into its tensors)
    shown_at_grid, saved_last = {}, {}
    real_save_samples, real_save_artifact = saves.save_samples, saves.save_artifact

    def recording_save_samples(accelerator, saving_to, family, parts, sample, resolution, step, strategy, dtype):
        shown_at_grid.update({k: v.clone() for k, v in strategy.state_dict().items()})
        real_save_samples(accelerator, saving_to, family, parts, sample, resolution, step, strategy, dtype)

    def recording_save_artifact(accelerator, saving_to, strategy, step, folder, header=None):
        if folder == saving_to.output_dir:
            saved_last.update({k: v.clone() for k, v in strategy.state_dict().items()})
        return real_save_artifact(accelerator, saving_to, strategy, step, folder, header)

    monkeypatch.setattr(saves, "save_samples", recording_save_samples)
    monkeypatch.setattr(saves, "save_artifact", recording_save_artifact)
    sections = {"train": {"max_steps": 4, "ema": {"decay": DECAY}}, "checkpoint": {"every": 0, "snapshot_every": 1},
                "sample": {"every": 4, "prompts": ["a purple sks"], "steps": 2}}
    out = tmp_path / "ema"
    artifact = train(parse_recipe(recipe_dict(tiny_base, concept_dir, out, **sections)))
    printed = capsys.readouterr().out
    reset_accelerate()
    monkeypatch.setattr(saves, "save_samples", real_save_samples)
    monkeypatch.setattr(saves, "save_artifact", real_save_artifact)
    plain = train(parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "plain",
                                           train={"max_steps": 4}, checkpoint={"every": 0})))

    # raw/ holds what the optimizer trained: bit for bit the artifact of the same run without EMA
    raw_path = out / "raw" / LORA_FILE
    raw, without_ema, average = load_file(raw_path), load_file(plain), load_file(artifact)
    assert raw.keys() == without_ema.keys() == average.keys()
    assert all(torch.equal(raw[k], without_ema[k]) for k in raw)
    # the artifact is the bias-corrected average of the trained weights after steps 1..4 (snapshots' raw/)
    trained = [load_file(out / "snapshots" / f"step-{s:06d}" / "raw" / LORA_FILE) for s in (1, 2, 3)] + [raw]
    weights = [DECAY ** (4 - s) * (1 - DECAY) / (1 - DECAY ** 4) for s in (1, 2, 3, 4)]
    for key in average:
        expected = sum(w * t[key].double() for w, t in zip(weights, trained)).float()
        torch.testing.assert_close(average[key], expected, rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(average[k], raw[k]) for k in raw)
    # each snapshot holds the average as it stood then; the last step's grid was drawn with the final average
    first = load_file(out / "snapshots" / "step-000001" / LORA_FILE)
    assert all(torch.equal(first[k], trained[0][k]) for k in first)  # the first update takes the weights whole
    assert shown_at_grid.keys() == saved_last.keys() and saved_last
    assert all(torch.equal(shown_at_grid[k], saved_last[k]) for k in saved_last)

    assert _header(artifact)["finetune.ema"] == "average" and _header(raw_path)["finetune.ema"].startswith("raw")
    assert _header(artifact)["finetune.ema_updates"] == "4" and _header(artifact)["finetune.ema_decay"] == "0.5"
    line = "ema: decay 0.5 every 1 step(s), on the accelerator, averaging about the last 2 steps"
    assert line in printed
    assert line in json.loads((out / "run.json").read_text())["plan"][-1]
    assert line in (out / "report.html").read_text()


@pytest.mark.parametrize("strategy", STRATEGIES.values(), ids=STRATEGIES.keys())
def test_a_resumed_ema_run_writes_the_same_files(tiny_base, concept_dir, tmp_path, strategy):
    # device: cpu, the staged path: an update still waiting at the checkpoint must be in it
    out = tmp_path / "out"
    recipe = parse_recipe(recipe_dict(tiny_base, concept_dir, out, strategy=strategy, checkpoint={"every": 2},
                                      train={"max_steps": 4, "batch_size": 2,
                                             "ema": {"decay": DECAY, "device": "cpu"}}))
    uninterrupted, resumed = straight_and_resumed(recipe, tmp_path / "uninterrupted")
    artifacts = [name for name in uninterrupted if not name.startswith("checkpoints/")]
    assert any(name.startswith("raw/") for name in artifacts), sorted(uninterrupted)
    differing = [name for name in artifacts if resumed.get(name) != uninterrupted[name]]
    assert not differing, f"these files differ between the resumed and the uninterrupted run: {differing}"
    # every strategy's artifact holds the average, not the trained weights (the view swapped what it saves)
    name = create_strategy(recipe.strategy).artifact_name
    raw_name = f"raw/{name}"
    shown = {n: b for n, b in uninterrupted.items() if n == name or n.startswith(f"{name}/")}
    assert shown and any(uninterrupted.get(raw_name + n[len(name):]) != b for n, b in shown.items()
                         if n.endswith((".safetensors", ".bin", ".pt")))
