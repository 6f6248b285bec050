"""Weights that stop being finite are never saved: the run stops at the checkpoint that would have held them,
and the one before stays the latest. (The catalogue in tests/bad_inputs.py covers a NaN loss and a full disk
through the command line.)"""
from __future__ import annotations

import pytest
import torch

from finetune.recipe.load import parse_recipe
from finetune.training import loop
from finetune.training.failures import TrainingDiverged, check_finite_weights
from tests.conftest import recipe_dict


def test_non_finite_weights_name_the_tensors_and_the_missing_checkpoint(tmp_path):
    check_finite_weights({"a": torch.ones(2), "steps": torch.tensor([3])}, 1, tmp_path)  # all finite: no error
    with pytest.raises(TrainingDiverged, match=r"by step 5 \(b\).*There is no checkpoint yet"):
        check_finite_weights({"a": torch.ones(2), "b": torch.tensor([1.0, float("inf")])}, 5, tmp_path)


def test_a_checkpoint_is_never_written_from_nan_weights(tiny_base, concept_dir, tmp_path, monkeypatch):
    from finetune.models.stable_diffusion import StableDiffusion

    kept = {}
    real_load = StableDiffusion.load

    def load_keeping_parts(self, *args, **kwargs):
        kept["parts"] = real_load(self, *args, **kwargs)
        return kept["parts"]

    def poison_after_step_2(step):
        if step == 2:  # as an fp16 overflow would: the loss of step 2 was finite, the weights after it are not
            with torch.no_grad():
                for parameter in kept["parts"].unet.parameters():
                    if parameter.requires_grad:
                        parameter.fill_(float("nan"))

    monkeypatch.setattr(StableDiffusion, "load", load_keeping_parts)
    out = tmp_path / "out"
    recipe = parse_recipe(recipe_dict(tiny_base, concept_dir, out, checkpoint={"every": 1}))
    with pytest.raises(TrainingDiverged, match=r"became NaN or infinite by step 2 .*step-000001, is kept"):
        loop.train(recipe, on_step=poison_after_step_2)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001"]
    assert not (out / "pytorch_lora_weights.safetensors").exists()
