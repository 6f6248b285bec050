"""train.ema's average (finetune/training/ema.py) on plain tensors: the bias-corrected formula, update_every, the
staged CPU path, the view's swap, the checkpoint round trip, and what validate refuses."""
from __future__ import annotations

import pytest
import torch

from finetune.recipe.schema import EmaOptions
from finetune.recipe.typed import build
from finetune.training.ema import WeightAverage, plan_line, problems


def _params() -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(5, 3, generator=generator)),
            torch.nn.Parameter(torch.randn(7, generator=generator))]


def _train(params, average: WeightAverage, steps: range, seed: int = 1) -> list[list[torch.Tensor]]:
    """Move the parameters as an optimizer would and update the average after each step; returns the weights
    after each step."""
    generator = torch.Generator().manual_seed(seed)
    seen = []
    for step in steps:
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=generator))
        average.after_step(step)
        seen.append([p.detach().clone() for p in params])
    return seen


@pytest.mark.parametrize("device", ["accelerator", "cpu"])
def test_the_average_is_the_bias_corrected_ema_of_the_updates(device):
    decay = 0.8
    params = _params()
    average = WeightAverage(params, EmaOptions(decay=decay, update_every=2, device=device), torch.device("cpu"))
    seen = _train(params, average, range(1, 8))  # updates at steps 2, 4, 6
    updated = [seen[1], seen[3], seen[5]]
    # Adam's correction: sum_i decay^(n-i) (1-decay) w_i / (1 - decay^n); the initial weights count for nothing
    n = len(updated)
    expected = [sum(decay ** (n - 1 - i) * (1 - decay) * w[k] for i, w in enumerate(updated)) / (1 - decay ** n)
                for k in range(len(params))]
    state = average.state_dict()
    assert state["updates"] == 3
    for got, want in zip(state["shadow"], expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_first_update_takes_the_weights_as_they_are():
    params = _params()
    average = WeightAverage(params, EmaOptions(decay=0.999), torch.device("cpu"))
    seen = _train(params, average, range(1, 2))
    assert all(torch.equal(s, w) for s, w in zip(average.state_dict()["shadow"], seen[0]))


def test_weights_that_do_not_move_stay_bit_exact():
    # textual inversion's frozen embedding rows are put back every step: their average must not drift by a bit
    row = torch.nn.Parameter(torch.full((4,), 0.1234567))
    average = WeightAverage([row], EmaOptions(decay=0.9), torch.device("cpu"))
    for step in range(1, 20):
        average.after_step(step)
    assert torch.equal(average.state_dict()["shadow"][0], row.detach())


def test_staged_on_the_cpu_gives_the_very_same_average_as_in_place():
    # device: cpu applies each update one update late (behind a copy); the numbers must not change
    direct_params, staged_params = _params(), _params()
    direct = WeightAverage(direct_params, EmaOptions(decay=0.9, device="accelerator"), torch.device("cpu"))
    staged = WeightAverage(staged_params, EmaOptions(decay=0.9, device="cpu"), torch.device("cpu"))
    assert staged.staged and not direct.staged
    _train(direct_params, direct, range(1, 6))
    _train(staged_params, staged, range(1, 6))
    assert staged.staged_weight is not None  # the last update is still waiting...
    for a, b in zip(direct.state_dict()["shadow"], staged.state_dict()["shadow"]):  # ...and is applied when read
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", ["accelerator", "cpu"])
def test_the_view_shows_the_average_and_gives_the_trained_weights_back_bit_exact(device):
    params = _params()
    average = WeightAverage(params, EmaOptions(decay=0.7, device=device), torch.device("cpu"))
    _train(params, average, range(1, 5))
    trained = [p.detach().clone() for p in params]
    storages = [p.data_ptr() for p in params]
    with average.shown():
        shown = [p.detach().clone() for p in params]
        assert [p.data_ptr() for p in params] == storages  # in place: compiled graphs see the same tensors
    assert all(torch.equal(p, t) for p, t in zip(params, trained))
    assert all(torch.equal(s, a) for s, a in zip(shown, average.state_dict()["shadow"]))
    assert not all(torch.equal(s, t) for s, t in zip(shown, trained))


@pytest.mark.parametrize("device", ["accelerator", "cpu"])
def test_an_average_put_back_from_its_state_goes_on_exactly(device):
    options = EmaOptions(decay=0.9, device=device)
    straight_params = _params()
    straight = WeightAverage(straight_params, options, torch.device("cpu"))
    _train(straight_params, straight, range(1, 7))

    first_params = _params()
    first = WeightAverage(first_params, options, torch.device("cpu"))
    _train(first_params, first, range(1, 4))
    state = first.state_dict()
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in first_params]
    resumed = WeightAverage(resumed_params, options, torch.device("cpu"))
    resumed.load_state_dict(state)
    # the same parameter moves as the straight run's steps 4..6 (its generator, drawn on from where it stopped)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p in first_params:
            torch.randn(p.shape, generator=generator)
    for step in range(4, 7):
        with torch.no_grad():
            for p in resumed_params:
                p.add_(torch.randn(p.shape, generator=generator))
        resumed.after_step(step)
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict()["shadow"], resumed.state_dict()["shadow"]))
    assert resumed.updates == straight.updates == 6


def test_a_checkpoint_of_other_shapes_is_refused():
    average = WeightAverage(_params(), EmaOptions(), torch.device("cpu"))
    with pytest.raises(ValueError, match="does not match the trained parameters"):
        average.load_state_dict({"updates": 1, "shadow": [torch.zeros(2)]})


def test_validate_names_each_bad_value_and_the_fix():
    assert problems(None, "schedule_free_adamw", 10) == []
    assert problems(EmaOptions(), "adamw", 10) == []
    found = problems(EmaOptions(update_every=11), "schedule_free_adamw", 10)
    assert len(found) == 2
    assert "between 1 and train.max_steps (10), got 11" in found[0]
    assert "already are an average" in found[1] and "leave train.ema out" in found[1]


def test_the_decay_and_update_every_bounds_are_declared_on_the_keys():
    errors: list[str] = []
    build(EmaOptions, {"decay": 1.0, "update_every": 0}, "train.ema", errors)
    assert errors[0].startswith("train.ema.decay: must be at least 0 and below 1 (0.999 averages about the last "
                                "1000 updates")
    assert errors[0].endswith("got 1.0")
    assert errors[1] == "train.ema.update_every: must be at least 1, got 0"


def test_the_plan_line_says_how_far_back_the_average_reaches():
    assert plan_line(None, 100) == []
    assert "about the last 100 steps" in plan_line(EmaOptions(decay=0.99), 500)[0]
    assert "about the last 200 steps" in plan_line(EmaOptions(decay=0.99, update_every=2), 500)[0]
    assert "all 500 steps" in plan_line(EmaOptions(decay=0.999), 500)[0]


def test_overwrite_removes_the_earlier_runs_raw_weights_and_nothing_else_in_raw(tmp_path):
    """--overwrite over a run that had train.ema: its raw/ copy of the artifact goes with its checkpoints, so a new
    run without EMA does not leave the old trained weights beside its own artifact; anything else a user keeps in
    a raw/ folder stays."""
    from finetune.training.ema import RAW_FOLDER
    from finetune.training.resume import check_output_dir, remove_earlier_run

    artifact = tmp_path / "pytorch_lora_weights.safetensors"
    artifact.write_bytes(b"x")
    raw = tmp_path / RAW_FOLDER
    raw.mkdir()
    (raw / artifact.name).write_bytes(b"x")
    (tmp_path / "checkpoints" / "step-000002").mkdir(parents=True)
    removed = check_output_dir(tmp_path, artifact, resume=None, overwrite=True, source="r.yaml")
    assert sorted(p.name for p in removed) == ["checkpoints", artifact.name]
    (raw / "IMG_0001.CR2").write_bytes(b"a user's photo")
    remove_earlier_run(removed)
    assert not (tmp_path / "checkpoints").exists() and not (raw / artifact.name).exists()
    assert (raw / "IMG_0001.CR2").read_bytes() == b"a user's photo"
    (raw / "IMG_0001.CR2").unlink()
    (raw / artifact.name).write_bytes(b"x")
    remove_earlier_run(check_output_dir(tmp_path, artifact, resume=None, overwrite=True, source="r.yaml"))
    assert not raw.exists()  # emptied by the removal: gone
