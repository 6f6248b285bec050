"""The validation score's parts without a model: fixed timesteps at the objectives' quantiles, the held-out split,
the recipe checks, and history lines (finetune/training/validation.py, data/prepare.py, models/ddpm.py and
flow_matching.py)."""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

from finetune.data.prepare import held_out_fraction, split_held_out
from finetune.data.sources import DataError, Example
from finetune.models.ddpm import DDPMObjective
from finetune.models.flow_matching import FlowMatchingObjective
from finetune.recipe.option_checks import check_validation
from finetune.recipe.load import RecipeError, parse_recipe
from finetune.recipe.schema import ValidationOptions
from finetune.report.history import History


@pytest.mark.parametrize("objective", [
    FlowMatchingObjective(sampling="logit_normal", logit_mean=0.3, logit_std=1.2),
    FlowMatchingObjective(sampling="sigmoid", sigmoid_scale=1.5, shift=3.0),
    FlowMatchingObjective(sampling="mode", mode_scale=1.29),
    FlowMatchingObjective(sampling="uniform", shift=2.0),
], ids=["logit_normal", "sigmoid+shift", "mode", "uniform+shift"])
def test_flow_fixed_sigmas_are_the_quantiles_of_the_sigmas_training_draws(objective):
    count = 5
    fixed = objective.fixed_points(count, 8, 8)
    drawn = objective.shifted(objective.draw(200_000, torch.Generator().manual_seed(0)), 8, 8)
    wanted = torch.quantile(drawn.double(), (torch.arange(count, dtype=torch.float64) + 0.5) / count)
    assert fixed.dtype == torch.float32 and fixed.shape == (count,)
    assert torch.allclose(fixed.double(), wanted, atol=5e-3), (fixed, wanted)


def test_ddpm_fixed_timesteps_are_the_midpoints_of_equal_slices():
    objective = DDPMObjective(DDPMScheduler(num_train_timesteps=1000), "epsilon")
    assert objective.fixed_points(4, 8, 8).tolist() == [125, 375, 625, 875]


@pytest.mark.parametrize("objective", [DDPMObjective(DDPMScheduler(num_train_timesteps=1000), "v_prediction"),
                                       FlowMatchingObjective()], ids=["ddpm", "flow"])
def test_noised_is_what_noise_makes_from_the_same_draws(objective):
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    drawn = objective.noise(latents, torch.Generator().manual_seed(2))
    again = torch.Generator().manual_seed(2)
    noise = torch.randn(latents.shape, generator=again)
    remade = objective.noised(latents, noise, drawn.timesteps)
    assert torch.equal(remade.noisy, drawn.noisy) and torch.equal(remade.target, drawn.target)


def _examples(count):
    return [Example(name=f"{i}.png", caption="x", load=None, size=(8, 8)) for i in range(count)]


def test_held_out_split_is_disjoint_seeded_and_refuses_too_few():
    kept, held = split_held_out(_examples(10), 0.3, seed=1)
    assert len(held) == 3 and len(kept) == 7 and not {e.name for e in kept} & {e.name for e in held}
    assert [e.name for e in split_held_out(_examples(10), 0.3, seed=1)[1]] == [e.name for e in held]
    assert [e.name for e in split_held_out(_examples(10), 0.3, seed=2)[1]] != [e.name for e in held]
    assert len(split_held_out(_examples(30), 0.1, seed=0)[1]) == 3  # 0.1 x 30 is 3, not 2.999
    with pytest.raises(DataError, match="holds out none .* at least 10 images"):
        split_held_out(_examples(4), 0.1, seed=0)
    with pytest.raises(DataError, match="at least 2 training images .* there are 1"):
        split_held_out(_examples(1), 0.99, seed=0)


def test_held_out_fraction_tells_a_fraction_from_a_folder():
    assert held_out_fraction("0.25") == 0.25 and held_out_fraction(None) is None
    assert held_out_fraction("held/out") is None and held_out_fraction("nan") is None


def _problems(tmp_path, base, **validation):
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    recipe = parse_recipe({"model": {"base": str(base)}, "data": {"images": str(images)},
                           "strategy": {"kind": "lora"}, "output_dir": str(tmp_path / "out")})
    recipe.validation = ValidationOptions(**validation)
    return check_validation(recipe)


def test_checks_name_each_bad_validation_value(tmp_path, tiny_base):
    problems = partial(_problems, tmp_path, tiny_base)
    assert problems() == [] and problems(images="0.2", every=5) == []
    assert "between 0 and 1" in problems(images="1.5")[0]
    assert "neither an existing folder" in problems(images=str(tmp_path / "nowhere"))[0]
    (tmp_path / "images" / "held").mkdir()
    assert "lies in data.images" in problems(images=str(tmp_path / "images" / "held"))[0]
    assert "validation.images is not" in problems(every=10)[0]


def test_validation_bounds_are_refused_where_the_recipe_is_read(tmp_path, tiny_base):
    images = tmp_path / "images"
    images.mkdir()
    with pytest.raises(RecipeError) as raised:
        parse_recipe({"model": {"base": str(tiny_base)}, "data": {"images": str(images)},
                      "strategy": {"kind": "lora"}, "output_dir": str(tmp_path / "out"),
                      "validation": {"images": "0.1", "timesteps": 0, "every": -1}})
    assert "validation.timesteps: must be at least 1 (8 is usual), got 0" in raised.value.problems
    assert "validation.every: must be at least 0, got -1" in raised.value.problems


def test_history_writes_the_validation_loss_only_on_the_steps_that_have_one(tmp_path: Path):
    history = History(tmp_path, keep_through=0)
    history.append({"step": 1, "loss": 0.5, "lr": 1e-4})
    history.append({"step": 2, "loss": 0.4, "lr": 1e-4, "validation_loss": 0.45})
    history.close()
    lines = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert "validation_loss" not in lines[0] and lines[1]["validation_loss"] == 0.45


def test_the_report_draws_the_validation_loss_beside_the_training_loss(tmp_path: Path):
    from finetune.report.page import build_page

    scores = {2: 0.7, 4: 0.4, 6: 0.5}
    history = History(tmp_path, keep_through=0)
    for step in range(1, 7):
        history.append({"step": step, "loss": 1.0 / step, "lr": 1e-4, "seconds_per_step": 0.1, "elapsed": step,
                        "time": 1e9 + step, **({"validation_loss": scores[step]} if step in scores else {})})
    history.close()
    page = build_page(tmp_path)
    assert "<!-- validation (held out) -->" in page  # the legend's entry (matplotlib keeps text as a comment)
    assert "0.5 at step 6, lowest 0.4 at step 4" in page
