"""A recipe that asks for the kohya file, and one that starts from a LoRA file another tool made (issue 8)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from finetune.cli import main
from finetune.export.lora import files as lora_layers  # read_lora, read_tensors
from finetune.recipe.load import RecipeError, parse_recipe
from finetune.strategies.base import StrategySetupError
from finetune.training import loop
from tests.helpers import images, pipeline, recipe_dict


def test_recipe_writes_a_kohya_file_that_loads_as_our_own(tiny_base, concept_dir, tmp_path):
    out = tmp_path / "my_lora"
    recipe = parse_recipe(recipe_dict(tiny_base, concept_dir, out, train={"max_steps": 2, "learning_rate": 1e-2},
                                      strategy={"kind": "lora", "rank": 2, "formats": ["diffusers", "kohya"]}))
    artifact = loop.train(recipe)
    kohya = out / "kohya" / "my_lora.safetensors"
    tensors, header = lora_layers.read_tensors(kohya)
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in tensors)
    assert header["ss_output_name"] == "my_lora" and header["ss_network_dim"] == "2"
    assert header["ss_num_train_images"] == "4" and header["ss_steps"] == "2"
    assert json.loads(header["ss_tag_frequency"]) == {concept_dir.name: {"a purple sks": 4}}
    ours, theirs = pipeline(tiny_base), pipeline(tiny_base)
    ours.load_lora_weights(str(artifact))
    theirs.load_lora_weights(str(kohya))
    assert np.abs(images(ours) - images(pipeline(tiny_base))).max() > 1e-3
    np.testing.assert_allclose(images(theirs), images(ours), atol=1e-5)


def test_training_starts_from_a_kohya_file(tiny_base, concept_dir, lora_file, tmp_path):
    kohya = tmp_path / "start.safetensors"
    assert main(["convert", str(lora_file), str(kohya), "--to", "kohya"]) == 0
    # a learning rate so small that the result must be the starting file itself
    recipe = parse_recipe(recipe_dict(
        tiny_base, concept_dir, tmp_path / "out", train={"max_steps": 1, "learning_rate": 1e-30},
        strategy={"kind": "lora", "initial_weights": str(kohya), "text_encoder": True}))
    result = lora_layers.read_lora(loop.train(recipe))
    start = lora_layers.read_lora(lora_file)
    assert {c: set(m) for c, m in result.layers.items()} == {c: set(m) for c, m in start.layers.items()}
    for component, module, layer in start.modules():
        trained = result.layers[component][module]
        assert (trained.rank, trained.alpha) == (layer.rank, layer.alpha)
        torch.testing.assert_close(trained.delta(), layer.delta(), atol=1e-6, rtol=0)


def test_starting_file_that_adapts_the_text_encoder_needs_text_encoder_true(tiny_base, concept_dir, lora_file,
                                                                            tmp_path):
    recipe = parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "out", train={"max_steps": 1},
                                      strategy={"kind": "lora", "initial_weights": str(lora_file)}))
    with pytest.raises(StrategySetupError, match="text_encoder: true"):
        loop.train(recipe)
    assert not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()


def test_starting_file_for_another_base_is_refused(tiny_base, concept_dir, tmp_path):
    other = tmp_path / "other.safetensors"
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({f"{stem}.lora_down.weight": torch.zeros(4, 768), f"{stem}.lora_up.weight": torch.zeros(32, 4)},
              str(other))
    recipe = parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "out", train={"max_steps": 1},
                                      strategy={"kind": "lora", "initial_weights": str(other)}))
    with pytest.raises(StrategySetupError, match="another base model"):
        loop.train(recipe)


@pytest.mark.parametrize("strategy, message", [
    ({"variant": "oft", "formats": ["kohya"]}, "holds no OFT here"),
    ({"use_dora": True, "formats": ["kohya"]}, "holds no DoRA here"),
    ({"formats": ["a1111"]}, "strategy.formats"),
    ({"initial_weights": "missing.safetensors"}, "not a .safetensors file"),
    ({"initial_weights": "x.safetensors", "target_modules": ["to_q"]}, "the file decides which layers"),
])
def test_bad_file_options_are_refused_before_loading(tiny_base, concept_dir, tmp_path, strategy, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "out", strategy={"kind": "lora", **strategy}))
