"""Prior preservation in the shared loop: class images drawn once and reused, and the prior loss weighted."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from finetune.data import class_images
from finetune.recipe.load import RecipeError, parse_recipe
from finetune.training.loop import train
from tests.helpers import recipe_dict

PRIOR = {"mode": "class_images", "class_prompt": ["a red circle", "a blue square"], "num_class_images": 4,
         "steps": 2, "guidance_scale": 1.0, "generation_batch_size": 3}
TRAIN = {"max_steps": 3, "batch_size": 2, "learning_rate": 1e-3, "seed": 3}


def _train(tiny_base, concept_dir, out, **sections):
    return load_file(train(parse_recipe(recipe_dict(tiny_base, concept_dir, out, train=TRAIN, **sections))))


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _largest_change(a, b):
    assert a.keys() == b.keys()
    return max((a[key] - b[key]).abs().max().item() for key in a)


def _assert_follows(plain, zero, weighted):
    """The weight-0 run follows the plain one up to float noise: its batch also holds the class half, so the
    matmuls sum in another order (differences of ~1e-6 after Adam's first steps on some CPUs, 0 on others), while
    the weighted class half moves the weights far more."""
    assert _largest_change(plain, zero) < 0.1 * _largest_change(plain, weighted)


def _assert_differ(a, b):
    assert any(not torch.allclose(a[key], b[key], atol=1e-6) for key in a)


def test_prior_weight_zero_gives_the_run_without_prior(tiny_base, concept_dir, tmp_path):
    plain = _train(tiny_base, concept_dir, tmp_path / "plain")
    cache = str(tmp_path / "cache")
    zero = _train(tiny_base, concept_dir, tmp_path / "zero", prior={**PRIOR, "loss_weight": 0.0,
                                                                    "class_data_dir": cache})
    weighted = _train(tiny_base, concept_dir, tmp_path / "one", prior={**PRIOR, "loss_weight": 1.0,
                                                                       "class_data_dir": cache})
    _assert_differ(plain, weighted)  # the class half does train when weighted
    _assert_follows(plain, zero, weighted)


def test_base_prediction_weight_zero_gives_the_run_without_prior(tiny_base, concept_dir, tmp_path):
    plain = _train(tiny_base, concept_dir, tmp_path / "plain")
    prior = {"mode": "base_prediction", "class_prompt": "a red circle"}
    zero = _train(tiny_base, concept_dir, tmp_path / "zero", prior={**prior, "loss_weight": 0.0})
    weighted = _train(tiny_base, concept_dir, tmp_path / "one", prior={**prior, "loss_weight": 1.0})
    _assert_differ(plain, weighted)
    _assert_follows(plain, zero, weighted)


def test_class_images_are_drawn_once_and_reused(tiny_base, concept_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    prior = {**PRIOR, "class_data_dir": str(cache)}
    calls = []
    real_draw = class_images._draw
    monkeypatch.setattr(class_images, "_draw", lambda pipe, spec, idx: calls.append(list(idx)) or
                        real_draw(pipe, spec, idx))
    first = _train(tiny_base, concept_dir, tmp_path / "first", prior=prior)
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    assert sorted(p.name for p in folder.glob("*.png")) == [f"{i:05d}.png" for i in range(4)]
    assert (folder / "00001.txt").read_text().strip() == "a blue square"  # prompts cycle
    assert calls == [[0, 1, 2], [3]]  # batched by generation_batch_size
    pixels = {p.name: p.read_bytes() for p in folder.glob("*.png")}

    calls.clear()
    second = _train(tiny_base, concept_dir, tmp_path / "second", prior=prior)
    assert calls == []  # all cached: nothing drawn, not even a pipeline built
    assert {p.name: p.read_bytes() for p in folder.glob("*.png")} == pixels
    _assert_same(first, second)

    # asking for more draws only the missing ones, and image 1 drawn again equals the cached one
    (folder / "00001.png").unlink()
    _train(tiny_base, concept_dir, tmp_path / "third", prior={**prior, "num_class_images": 6})
    assert calls == [[1, 4, 5]]
    assert (folder / "00001.png").read_bytes() == pixels["00001.png"]


def test_the_cache_is_keyed_by_what_draws_the_images(tiny_base):
    spec = class_images.ClassImageSpec(base_model=str(tiny_base), prompts=("a dog",), resolution=32, seed=0,
                                       steps=2, guidance_scale=1.0, negative_prompt="")
    other_seed = class_images.ClassImageSpec(**{**spec.__dict__, "seed": 1})
    other_size = class_images.ClassImageSpec(**{**spec.__dict__, "resolution": 64})
    other_base = class_images.ClassImageSpec(**{**spec.__dict__, "base_model": "someone/else"})
    names = {s.folder_name() for s in (spec, other_seed, other_size, other_base)}
    assert len(names) == 4
    assert spec.folder_name().startswith("a-dog-")


def test_a_base_retrained_in_place_gets_its_own_class_images(tiny_base, tmp_path):
    import shutil

    copy = tmp_path / "base"
    shutil.copytree(tiny_base, copy)
    before = class_images.base_identity(str(copy), None, None)
    assert class_images.base_identity(str(copy), None, None) == before  # stable while nothing changes
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # retrained: new weights, same path
    weights.write_bytes(bytes(data))
    assert class_images.base_identity(str(copy), None, None) != before


@pytest.mark.parametrize("prior, problem", [
    ({"mode": "class_images"}, "prior.class_prompt"),
    ({"mode": "base_prediction", "class_prompt": "a dog", "loss_weight": -1}, "prior.loss_weight"),
    ({"mode": "class_images", "class_prompt": "a dog", "num_class_images": 1}, "fewer than one batch"),
    ({"mode": "class_imgs", "class_prompt": "a dog"}, "did you mean 'class_images'"),
])
def test_bad_prior_settings_are_named_before_training(tiny_base, concept_dir, tmp_path, prior, problem):
    with pytest.raises(RecipeError, match=problem):
        parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "out", train={"batch_size": 2}, prior=prior))
