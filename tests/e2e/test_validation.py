"""The validation score (recipe section `validation`, finetune/training/validation.py) in real runs on the tiny base:
it never changes training, lands on the right history lines and trackers, repeats after a resume, is scored with
the weights the run shows, and a held-out fraction is never trained on."""
from __future__ import annotations

import shutil
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file

from finetune.recipe.load import parse_recipe
from finetune.report.history import read_history
from finetune.training.loop import run_steps, train
from finetune.training.run import setup
from finetune.training.validation import validation_loss
from tests.helpers import Crash, crash_at_step_3, draw_concept, history_of, recipe_dict, reset_accelerate


@pytest.fixture(scope="module")
def held_out_dir(tmp_path_factory):
    # other images than the training ones: a different caption and size, read like data.images
    return draw_concept(tmp_path_factory.mktemp("held") / "held", count=2, caption="a purple shape", size=40)


def _recipe(tiny_base, concept_dir, out, **sections):
    return parse_recipe(recipe_dict(tiny_base, concept_dir, out, **sections))


def test_validation_leaves_training_bit_identical_and_scores_every_n_steps(tiny_base, concept_dir, held_out_dir,
                                                                          tmp_path):
    plain = train(_recipe(tiny_base, concept_dir, tmp_path / "plain"))
    reset_accelerate()
    scored = train(_recipe(tiny_base, concept_dir, tmp_path / "scored",
                           validation={"images": str(held_out_dir), "every": 3, "timesteps": 4}))
    # its own generator: the training draws, losses and weights are those of the run without it
    assert history_of(tmp_path / "plain") == history_of(tmp_path / "scored")
    a, b = load_file(plain), load_file(scored)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    values = {r["step"]: r.get("validation_loss") for r in read_history(tmp_path / "scored")}
    assert [step for step, v in values.items() if v is not None] == [3, 4]  # every 3 steps, and the last (4)
    assert all(v > 0 for v in values.values() if v is not None) and values[3] != values[4]
    assert "validation_loss" not in read_history(tmp_path / "plain")[-1]


def test_the_score_at_a_step_is_the_same_after_a_resume(tiny_base, concept_dir, held_out_dir, tmp_path):
    out = tmp_path / "out"
    recipe = _recipe(tiny_base, concept_dir, out, checkpoint={"every": 2},
                     validation={"images": str(held_out_dir), "every": 2, "timesteps": 3})
    train(recipe)
    straight = [(r["step"], r.get("validation_loss")) for r in read_history(out)]
    shutil.rmtree(out)
    reset_accelerate()
    with pytest.raises(Crash):
        train(recipe, on_step=crash_at_step_3)
    reset_accelerate()
    train(recipe, resume="latest")
    assert [(r["step"], r.get("validation_loss")) for r in read_history(out)] == straight
    assert straight[1][1] is not None and straight[3][1] is not None


def test_scored_with_the_weights_the_run_shows_and_logged_to_trackers(tiny_base, concept_dir, held_out_dir, tmp_path):
    recipe = _recipe(tiny_base, concept_dir, tmp_path / "out", train={"max_steps": 2, "learning_rate": 1e-2},
                     validation={"images": str(held_out_dir), "every": 1, "timesteps": 4})
    with setup(recipe) as run:
        untrained = validation_loss(run, run.settings)  # LoRA's B starts at zero: the base's own score
        assert validation_loss(run, run.settings) == untrained  # fixed noise and timesteps
        lora_b = [p for n, p in run.parts.denoiser.named_parameters() if "lora_B" in n]

        @contextmanager
        def untrained_view():  # shows the LoRA switched off, as an EMA view would show its average
            kept = [p.detach().clone() for p in lora_b]
            with torch.no_grad():
                for p in lora_b:
                    p.zero_()
            yield
            with torch.no_grad():
                for p, value in zip(lora_b, kept):
                    p.copy_(value)

        run.weight_views.append(untrained_view)
        logged = []
        log = run.accelerator.log
        run.accelerator.log = lambda values, step: logged.append((step, dict(values))) or log(values, step=step)
        run_steps(run)
        assert any(p.abs().sum() > 0 for p in lora_b)  # training went on with the trained weights
        assert validation_loss(run, run.settings) != untrained
    history = read_history(tmp_path / "out")
    assert [r["validation_loss"] for r in history] == [untrained, untrained]
    assert [(step, values["validation/loss"]) for step, values in logged if "validation/loss" in values] == [
        (1, untrained), (2, untrained)]


def test_a_held_out_fraction_is_never_trained_on_and_the_summary_says_so(tiny_base, tmp_path):
    images = draw_concept(tmp_path / "images", count=5)
    recipe = parse_recipe(recipe_dict(tiny_base, images, tmp_path / "out",
                                      validation={"images": "0.4", "every": 2, "seed": 3}))
    with setup(recipe) as run:
        trained = {e.name for e in run.loader.dataset.examples}
        assert len(trained) == 3 and len(run.validation.images) == 2
        assert any("validation: 2 held-out image(s) (0.4 of the training images, not trained on)" in line
                   for line in run.summary)


@pytest.mark.parametrize("shade, unmasked_weight", [(255, 0.0), (0, 0.0), (0, 0.5)])
def test_held_out_images_with_masks_are_scored_as_training_weighs_them(tiny_base, tmp_path, shade, unmasked_weight):
    """data.masks with a held-out fraction: the score weighs each held-out image's pixels by its mask, as the
    training loss does. An all-white mask scores as no mask, an all-black one 0 (or unmasked_weight x the score)."""
    from PIL import Image

    images = draw_concept(tmp_path / "images", count=5)
    masks = tmp_path / "masks"
    masks.mkdir()
    for image in images.glob("*.png"):
        Image.new("L", Image.open(image).size, shade).save(masks / image.name)

    def score(**data):
        recipe = parse_recipe(recipe_dict(tiny_base, images, tmp_path / f"out{len(data)}", data={
            "images": str(images), **data}, validation={"images": "0.4", "seed": 3}))
        with setup(recipe) as run:
            assert all((image.mask is not None) == bool(data) for image in run.validation.images)
            value = validation_loss(run, run.settings)
        reset_accelerate()
        return value

    plain = score()
    masked = score(masks=str(masks), unmasked_weight=unmasked_weight)
    expected = plain if shade == 255 else unmasked_weight * plain
    assert plain > 0 and masked == pytest.approx(expected, rel=1e-5, abs=1e-9)
