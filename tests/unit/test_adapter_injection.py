"""Adapter layers go in and out through peft itself (finetune/networks/peft_layers.py), never through the
adapter wrappers of transformers or diffusers, whose own minimum-peft gates are not ours: transformers 5.24
refused every released peft and stopped every text-encoder LoRA run. Here both libraries' gates are made to
refuse, as that release did, and every path of ours that adds, trains, saves, resumes, loads, scales, removes
or fuses adapters must still work."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from finetune import load_adapter, unload_adapter
from finetune.recipe.load import parse_recipe
from finetune.training.loop import train
from tests.helpers import images, pipeline, recipe_dict

GATE_MESSAGE = "The version of PEFT you are using is not compatible, please use a version >= 99.0.0"


@pytest.fixture
def wrappers_refuse(monkeypatch):
    """transformers' and diffusers' adapter methods (add_adapter, enable/disable_adapters, set_adapter,
    delete_adapters, ...) all call their module's check_peft_version first: make it refuse."""
    import diffusers.loaders.peft
    import transformers.integrations.peft

    def refuse(min_version):
        raise ValueError(GATE_MESSAGE)

    monkeypatch.setattr(transformers.integrations.peft, "check_peft_version", refuse)
    monkeypatch.setattr(diffusers.loaders.peft, "check_peft_version", refuse)


def test_the_gates_really_refuse(wrappers_refuse, tiny_base):
    """Guards the other tests: the patched gates stop the wrappers a regression would call."""
    from peft import LoraConfig

    pipe = pipeline(tiny_base)
    for module in (pipe.text_encoder, pipe.unet):
        with pytest.raises(ValueError, match="99.0.0"):
            module.add_adapter(LoraConfig(r=2, target_modules=["q_proj", "to_q"]))


STRATEGIES = {
    "lora": {"kind": "lora", "rank": 4, "text_encoder": True},
    "dora": {"kind": "lora", "rank": 4, "use_dora": True, "text_encoder": True},
    "loha": {"kind": "lora", "variant": "loha", "rank": 4, "text_encoder": True},
}


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_text_encoder_adapters_train_resume_and_load_with_the_wrappers_refusing(
        name, wrappers_refuse, tiny_base, concept_dir, tmp_path):
    # base_prediction switches the adapters off for the frozen base's targets at every step
    common = dict(strategy=STRATEGIES[name], train={"max_steps": 3},
                  prior={"mode": "base_prediction", "class_prompt": ["a photo"]})
    full = load_file(train(parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "full", **common))))
    assert any(key.startswith("text_encoder.") for key in full)

    part = parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "part", checkpoint={"every": 1}, **common))
    artifact = train(part)
    # resume from step 2 (the checkpoint's adapter weights go back in through peft_layers too)
    import shutil

    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step-000003", ignore_errors=True)
    artifact.unlink()
    resumed = load_file(train(part, resume="latest"))
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), key

    if name == "loha":  # diffusers has no LoHa loader: finetune's own loader injects, scales and removes
        pipe = pipeline(tiny_base)
        before = images(pipe)
        loaded = load_adapter(pipe, artifact, scale=0.5)
        assert not np.allclose(images(pipe), before, atol=1e-4)
        assert unload_adapter(pipe, loaded) == [loaded]
        np.testing.assert_allclose(images(pipe), before, atol=1e-6)


def test_merge_fuses_with_the_wrappers_refusing(wrappers_refuse, tiny_base, concept_dir, tmp_path):
    from finetune.cli import main

    strategy = {"kind": "lora", "variant": "loha", "rank": 4, "text_encoder": True}
    artifact = train(parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "run", strategy=strategy,
                                              train={"max_steps": 2, "learning_rate": 1e-2})))
    reference = pipeline(tiny_base)
    load_adapter(reference, artifact)
    assert main(["merge", "--base", str(tiny_base), "--lora", str(artifact), "--out", str(tmp_path / "merged"),
                 "--save-dtype", "fp32"]) == 0
    np.testing.assert_allclose(images(pipeline(tmp_path / "merged")), images(reference), atol=1e-4)
