"""DreamBooth: the whole U-Net (and the text encoder when asked) trains; the result is a pipeline folder."""
from __future__ import annotations

import json

import pytest
import torch

from finetune.recipe.load import RecipeError, parse_recipe
from finetune.training.loop import train
from tests.helpers import recipe_dict

DREAMBOOTH = {"kind": "dreambooth"}
TRAIN = {"max_steps": 3, "batch_size": 2, "learning_rate": 1e-4, "seed": 0}


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().float() for k, v in module.state_dict().items()}


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.fixture(scope="module")
def base_states(tiny_base):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_base)
    return {name: _state(getattr(pipe, name)) for name in ("unet", "text_encoder", "vae")}


def _run(tiny_base, concept_dir, out, strategy=None, **sections):
    recipe = parse_recipe(recipe_dict(tiny_base, concept_dir, out, strategy=strategy or DREAMBOOTH,
                                      train={**TRAIN, **sections.pop("train", {})}, **sections))
    return train(recipe)


def test_only_the_unet_changes_and_the_folder_is_a_pipeline(tiny_base, concept_dir, tmp_path, base_states):
    from diffusers import DiffusionPipeline

    artifact = _run(tiny_base, concept_dir, tmp_path / "out")
    assert artifact == tmp_path / "out" / "pipeline"
    pipe = DiffusionPipeline.from_pretrained(artifact)
    unet_changed = _changed(base_states["unet"], _state(pipe.unet))
    assert len(unet_changed) > len(base_states["unet"]) // 2  # the whole U-Net trains, not a few layers
    assert _changed(base_states["text_encoder"], _state(pipe.text_encoder)) == set()
    assert _changed(base_states["vae"], _state(pipe.vae)) == set()
    assert list(artifact.glob("unet/*.safetensors"))  # safetensors, not pickles
    metadata = json.loads((artifact / "finetune.json").read_text())
    assert metadata["finetune.strategy"] == "dreambooth" and metadata["finetune.steps"] == "3"
    assert not list((tmp_path / "out").glob(".pipeline.*"))  # neither the temporary folder nor the one moved aside


def test_text_encoder_trains_only_for_its_steps(tiny_base, concept_dir, tmp_path, base_states):
    from diffusers import DiffusionPipeline

    strategy = {"kind": "dreambooth", "text_encoder": True, "text_encoder_learning_rate": 1e-3}
    two = DiffusionPipeline.from_pretrained(_run(tiny_base, concept_dir, tmp_path / "two",
                                                 strategy={**strategy, "text_encoder_steps": 2}))
    assert _changed(base_states["text_encoder"], _state(two.text_encoder))  # it trained
    # stopping after 2 steps leaves it exactly as a 2-step run left it, while the U-Net goes on
    stopped = _run(tiny_base, concept_dir, tmp_path / "stopped", strategy={**strategy, "text_encoder_steps": 2},
                   train={"max_steps": 4})
    short = _run(tiny_base, concept_dir, tmp_path / "short", strategy=strategy, train={"max_steps": 2})
    stopped, short = DiffusionPipeline.from_pretrained(stopped), DiffusionPipeline.from_pretrained(short)
    assert _changed(_state(short.text_encoder), _state(stopped.text_encoder)) == set()
    assert _changed(_state(short.unet), _state(stopped.unet))


def test_fp16_on_request(tiny_base, concept_dir, tmp_path, caplog, monkeypatch):
    import logging

    from diffusers import DiffusionPipeline
    from safetensors import safe_open

    monkeypatch.setattr(logging.getLogger("diffusers"), "handlers", [caplog.handler])  # it does not propagate
    artifact = _run(tiny_base, concept_dir, tmp_path / "out", strategy={"kind": "dreambooth", "save_dtype": "fp16"},
                    train={"max_steps": 1})
    # the cast to the saved dtype is torch's own: diffusers' .to(dtype) printed a false alarm on every save
    assert "kept in float32" not in caplog.text
    for name in ("unet", "text_encoder", "vae"):
        (weights,) = (artifact / name).glob("*.safetensors")
        with safe_open(str(weights), framework="pt") as handle:
            assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.float16}, name
    pipe = DiffusionPipeline.from_pretrained(artifact, dtype=torch.float16)
    assert pipe.unet.dtype == torch.float16


def test_base_prediction_prior_keeps_a_frozen_copy_and_says_so(tiny_base, concept_dir, tmp_path, caplog,
                                                                base_states):
    from finetune.training import loop

    prior = {"mode": "base_prediction", "class_prompt": "a red circle"}
    recipe = parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "out", strategy=DREAMBOOTH, prior=prior,
                                      train={**TRAIN, "max_steps": 2, "mixed_precision": "bf16"}))
    with caplog.at_level("WARNING"):
        # bf16: the frozen copy stays in the base's half precision while the trained U-Net is fp32
        with loop.setup(recipe) as run:
            loop.run_steps(run)
            artifact = loop.finish(run)
    assert artifact.is_dir()
    assert "frozen copy of the unet" in caplog.text and "GiB" in caplog.text
    # the copy is the base as it was (in the base's bf16), while the trained U-Net moved on
    frozen = _state(run.strategy.frozen["unet"])
    as_loaded = {k: v.to(torch.bfloat16).float() for k, v in base_states["unet"].items()}
    assert _changed(as_loaded, frozen) == set()
    assert _changed(base_states["unet"], _state(run.strategy.modules["unet"]))


def test_resume_reproduces_the_uninterrupted_run(tiny_base, concept_dir, tmp_path):
    from diffusers import DiffusionPipeline

    strategy = {"kind": "dreambooth", "text_encoder": True, "text_encoder_steps": 1}
    full = DiffusionPipeline.from_pretrained(_run(tiny_base, concept_dir, tmp_path / "full", strategy=strategy,
                                                  train={"max_steps": 4}))
    recipe = parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "part", strategy=strategy,
                                      train={**TRAIN, "max_steps": 4}, checkpoint={"every": 2}))
    train(recipe)
    import shutil

    shutil.rmtree(tmp_path / "part" / "pipeline")
    resumed = DiffusionPipeline.from_pretrained(train(recipe, resume=str(tmp_path / "part" / "checkpoints" /
                                                                          "step-000002")))
    for name in ("unet", "text_encoder"):
        assert _changed(_state(getattr(full, name)), _state(getattr(resumed, name))) == set(), name


@pytest.mark.parametrize("strategy, problem", [
    ({"kind": "dreambooth", "text_encoder_steps": 5}, "strategy.text_encoder_"),
    ({"kind": "dreambooth", "text_encoder": True, "text_encoder_steps": 0}, "strategy.text_encoder_steps"),
    ({"kind": "dreambooth", "save_dtype": "fp8"}, "strategy.save_dtype"),
    ({"kind": "dreambooth", "rank": 4}, "strategy.rank: unknown key"),
])
def test_bad_dreambooth_settings_are_named(tiny_base, concept_dir, tmp_path, strategy, problem):
    with pytest.raises(RecipeError, match=problem):
        parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "out", strategy=strategy))


def test_trainable_modules_train_those_layers_and_leave_the_rest(tiny_base, concept_dir, tmp_path, base_states):
    from diffusers import DiffusionPipeline

    strategy = {"kind": "dreambooth", "trainable_modules": ["attn2.to_k", "attn2.to_v"]}
    pipe = DiffusionPipeline.from_pretrained(_run(tiny_base, concept_dir, tmp_path / "out", strategy=strategy))
    changed = _changed(base_states["unet"], _state(pipe.unet))
    assert changed and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in changed), sorted(changed)
    wanted = {k for k in base_states["unet"] if ".attn2.to_k." in k or ".attn2.to_v." in k}
    assert changed == wanted  # every weight of every named layer trained, and nothing else


def test_trainable_modules_naming_no_layer_fail_before_training(tiny_base, concept_dir, tmp_path):
    from finetune.strategies.base import StrategySetupError

    strategy = {"kind": "dreambooth", "trainable_modules": ["attn2.to_k", "attn.to_kk"]}
    with pytest.raises(StrategySetupError, match=r"trainable_modules: attn\.to_kk names no layer of the unet"):
        _run(tiny_base, concept_dir, tmp_path / "out", strategy=strategy)
    assert not (tmp_path / "out" / "pipeline").exists()
