"""train.optimizer's registry (finetune/training/optimizers.py): every optimizer trains, round-trips its state,
takes the recipe's adam_* keys only where they mean the same, and is checked against its real constructor."""
from __future__ import annotations

import copy
import importlib.util
import inspect
import math

import pytest
import torch

from finetune.training import optimizers
from finetune.training.optim import build_optimizer, build_scheduler, schedule_for

RECIPE_VALUES = {"betas": (0.9, 0.999), "weight_decay": 1e-2, "eps": 1e-8}
# a rate each optimizer trains the tiny model below with in 60 steps (Adafactor: its relative step, not this)
RATES = {"adamw": 3e-2, "adamw8bit": 3e-2, "prodigy": 1.0, "adafactor": 3e-2, "lion": 3e-3,
         "schedule_free_adamw": 3e-2}


def _available(name: str) -> bool:
    return importlib.util.find_spec(optimizers.REGISTRY[name].module.split(".")[0]) is not None


EACH = [pytest.param(name, marks=pytest.mark.skipif(not _available(name), reason=f"{name}'s package is not here"))
        for name in optimizers.REGISTRY]


def _problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    inputs, targets = torch.randn(64, 8), torch.randn(64, 4)
    return model, lambda: torch.nn.functional.mse_loss(model(inputs), targets)


def _steps(optimizer, loss_of, count: int) -> list[float]:
    losses = []
    for _ in range(count):
        loss = loss_of()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _build(name: str, model, args=None):
    groups = [{"params": list(model.parameters()), "lr": RATES[name]}]
    return build_optimizer(groups, name, RECIPE_VALUES["betas"], RECIPE_VALUES["weight_decay"],
                           RECIPE_VALUES["eps"], args=args)


@pytest.mark.parametrize("name", EACH)
def test_each_optimizer_trains_a_tiny_model(name):
    model, loss_of = _problem()
    losses = _steps(_build(name, model), loss_of, 60)
    assert losses[-1] < 0.85 * losses[0], losses


@pytest.mark.parametrize("name", EACH)
def test_each_optimizer_goes_on_exactly_from_its_saved_state(name):
    model, loss_of = _problem()
    optimizer = _build(name, model)
    straight = _steps(optimizer, loss_of, 6)
    final = [p.detach().clone() for p in model.parameters()]

    model, loss_of = _problem()
    optimizer = _build(name, model)
    first = _steps(optimizer, loss_of, 3)
    weights, state = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    model, loss_of = _problem()  # a new process: fresh weights and optimizer, then the saved ones put back
    model.load_state_dict(weights)
    optimizer = _build(name, model)
    optimizer.load_state_dict(state)
    assert first + _steps(optimizer, loss_of, 3) == straight
    for resumed, uninterrupted in zip(model.parameters(), final):
        assert torch.equal(resumed, uninterrupted)


def test_adam_keys_reach_only_the_optimizers_that_read_them_the_same_way():
    recipe = {"lr": 1.0, "betas": (0.8, 0.95), "weight_decay": 0.5, "eps": 1e-6}
    assert optimizers.keyword_arguments("prodigy", {}, **recipe) == recipe
    assert optimizers.keyword_arguments("schedule_free_adamw", {}, warmup_steps=7, **recipe) == {
        **recipe, "warmup_steps": 7}
    # Lion's betas and Adafactor's eps mean other things: their libraries' defaults stay
    assert optimizers.keyword_arguments("lion", {}, **recipe) == {"lr": 1.0, "weight_decay": 0.5}
    assert optimizers.keyword_arguments("adafactor", {"relative_step": False}, **recipe) == {
        "lr": 1.0, "weight_decay": 0.5, "relative_step": False}
    assert optimizers.keyword_arguments("adafactor", {}, **recipe)["lr"] is None  # its relative step
    # optimizer_args win over a mapped key
    assert optimizers.keyword_arguments("prodigy", {"betas": (0.9, 0.99)}, **recipe)["betas"] == (0.9, 0.99)


def test_adamw_is_built_as_before():
    model, _ = _problem()
    cpu = _build("adamw", model)
    assert type(cpu) is torch.optim.AdamW and cpu.defaults["foreach"] is True and not cpu.defaults["fused"]
    assert cpu.param_groups[0]["betas"] == (0.9, 0.999) and cpu.param_groups[0]["weight_decay"] == 1e-2
    assert optimizers.keyword_arguments("adamw", {}, lr=1e-4, device_type="cuda", **RECIPE_VALUES)["fused"] is True


@pytest.mark.parametrize("name", EACH)
def test_an_unknown_argument_is_refused_naming_the_real_ones(name):
    cls = optimizers.optimizer_class(name)
    real = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "params", "lr")]
    misspelled = real[-1] + "x"
    found = optimizers.problems(name, {misspelled: 1}, RATES[name], "constant", 0)
    assert len(found) == 1
    assert f"takes no argument {misspelled!r}; did you mean {real[-1]!r}?" in found[0]
    assert found[0].endswith(f"Its arguments: {', '.join(real)}")
    assert optimizers.problems(name, {}, RATES[name], "constant", 0) == []


def test_values_the_library_refuses_are_named_before_any_model_loads():
    found = optimizers.problems("adafactor", {"relative_step": False, "warmup_init": True}, 1e-3, "constant", 0)
    assert found == ["train.optimizer_args: adafactor refuses {'relative_step': False, 'warmup_init': True}: "
                     "ValueError: `warmup_init=True` requires `relative_step=True`"]
    assert "lr is set from train.learning_rate" in optimizers.problems("lion", {"lr": 1e-4}, 1e-4, "constant", 0)[0]


def test_rates_and_schedules_that_cannot_apply_are_refused():
    assert "1.0 is usual" in optimizers.problems("prodigy", {}, 1e-4, "constant", 0)[0]
    assert optimizers.problems("prodigy", {}, 0.5, "cosine", 10) == []
    assert "relative step" in optimizers.problems("adafactor", {}, 1e-4, "cosine", 0)[0]
    assert "relative step" in optimizers.problems("adafactor", {}, 1e-4, "constant", 5)[0]
    assert optimizers.problems("adafactor", {"relative_step": False}, 1e-4, "cosine", 5) == []
    assert "needs no schedule" in optimizers.problems("schedule_free_adamw", {}, 1e-3, "linear", 0)[0]
    assert optimizers.problems("schedule_free_adamw", {}, 1e-3, "constant", 5) == []
    assert "keep one" in optimizers.problems("schedule_free_adamw", {"warmup_steps": 3}, 1e-3, "constant", 5)[0]


def test_a_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(optimizers.REGISTRY, "prodigy", optimizers.REGISTRY["prodigy"].__class__(
        "no_such_module_here", "Prodigy", "prodigyopt", "pip install 'finetune[optimizers]'", (), ""))
    found = optimizers.problems("prodigy", {}, 1.0, "constant", 0)
    assert len(found) == 1 and "pip install 'finetune[optimizers]'" in found[0] and "needs prodigyopt" in found[0]


def test_adafactors_relative_step_is_the_logged_rate_and_the_schedule_does_not_touch_it():
    model, loss_of = _problem()
    optimizer = _build("adafactor", model)
    scheduler = build_scheduler(optimizer, *schedule_for("adafactor", {}, "constant", 0, 10))
    logged = []
    for _ in range(5):
        logged.append(optimizer.param_groups[0]["lr"])
        _steps(optimizer, loss_of, 1)
        scheduler.step()
    assert logged == [min(1e-2, 1 / math.sqrt(step)) for step in range(1, 6)]
    # the same steps as transformers' Adafactor built by hand with its defaults: the group's lr is not read
    from transformers.optimization import Adafactor

    reference_model, reference_loss = _problem()
    _steps(Adafactor(reference_model.parameters(), weight_decay=1e-2), reference_loss, 5)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference_model.parameters()))


def test_schedule_free_shows_its_averaged_point_and_puts_the_trained_bits_back():
    model, loss_of = _problem()
    optimizer = _build("schedule_free_adamw", model)
    _steps(optimizer, loss_of, 5)
    trained = [p.detach().clone() for p in model.parameters()]
    beta1 = optimizer.param_groups[0]["betas"][0]
    averaged = [y.lerp(optimizer.state[p]["z"], 1 - 1 / beta1) for y, p in zip(trained, model.parameters())]
    [view] = optimizers.weight_views("schedule_free_adamw", optimizer)
    with view():
        shown = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(s, a) for s, a in zip(shown, averaged))
    assert not all(torch.equal(s, t) for s, t in zip(shown, trained))
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), trained))  # bit for bit, not a lerp back
    _steps(optimizer, loss_of, 1)  # still in train mode: it steps
    assert optimizers.weight_views("adamw", optimizer) == []


def test_the_summary_line_says_which_rate_and_schedule_apply():
    assert optimizers.summary_line("adamw", {}, 1e-4, "cosine", 0) == (
        "optimizer: adamw (torch.optim.AdamW): rate 0.0001 (usual: 1e-4 for LoRA), schedule cosine")
    assert "its relative step sets the rate" in optimizers.summary_line("adafactor", {}, 1e-4, "constant", 0)
    line = optimizers.summary_line("schedule_free_adamw", {"r": 0.5}, 1e-3, "constant", 20)
    assert line.startswith("optimizer: schedule_free_adamw (schedulefree.AdamWScheduleFree; r=0.5): rate 0.001, "
                           "no schedule, warmup 20 step(s)")
