"""The bounds the strategies and the model families declare on their keys (finetune/recipe/keys.py) refuse a recipe
that breaks them, before any model loads, with one message naming the key: they replaced each options class's own
"must be at least 1" checks, so these cases are what those checks refused."""
from __future__ import annotations

import pytest
import yaml

from finetune.models.tiny import save_tiny_pipeline
from finetune.recipe.load import RecipeError, parse_recipe
from tests.helpers import recipe_dict

TI = {"kind": "textual_inversion", "placeholder_token": "<sks>", "initializer_token": "triangle"}
HN = {"kind": "hypernetwork"}
DB = {"kind": "dreambooth", "text_encoder": True}
LORA_TE = {"kind": "lora", "text_encoder": True}
LOCON = {"kind": "lora", "conv_layers": True}

STRATEGY_CASES = [
    ({"kind": "lora", "rank": 0}, "strategy.rank: must be at least 1, got 0"),
    ({"kind": "lora", "alpha": 0}, "strategy.alpha: must be positive, got 0.0"),
    ({"kind": "lora", "dropout": 1.0}, "strategy.dropout: must be at least 0 and below 1, got 1.0"),
    ({**LORA_TE, "text_encoder_rank": 0}, "strategy.text_encoder_rank: must be at least 1, got 0"),
    ({**LORA_TE, "text_encoder_2_rank": -2}, "strategy.text_encoder_2_rank: must be at least 1, got -2"),
    ({**LORA_TE, "text_encoder_learning_rate": -1e-4},
     "strategy.text_encoder_learning_rate: must be positive, got -0.0001"),
    ({**LORA_TE, "text_encoder_2_learning_rate": 0},
     "strategy.text_encoder_2_learning_rate: must be positive, got 0.0"),
    ({**LOCON, "conv_rank": 0}, "strategy.conv_rank: must be at least 1, got 0"),
    ({**LOCON, "conv_alpha": -1}, "strategy.conv_alpha: must be positive, got -1.0"),
    ({**DB, "text_encoder_learning_rate": 0}, "strategy.text_encoder_learning_rate: must be positive, got 0.0"),
    ({**DB, "text_encoder_steps": 0}, "strategy.text_encoder_steps: must be at least 1, got 0"),
    ({**TI, "num_vectors": 0}, "strategy.num_vectors: must be at least 1, got 0"),
    ({**HN, "dropout": -0.1}, "strategy.dropout: must be at least 0 and below 1, got -0.1"),
]

MODEL_CASES = [
    ("sd", {"min_snr_gamma": 0}, "model.min_snr_gamma: must be positive (5.0 is usual), got 0.0"),
    ("sd", {"noise_offset": -0.1}, "model.noise_offset: must be at least 0 (0.05-0.1 is usual), got -0.1"),
    ("sd3", {"flow": {"shift": 0}}, "model.flow.shift: must be positive (3.0 is SD3's), got 0.0"),
    ("sd3", {"flow": {"logit_std": -1}}, "model.flow.logit_std: must be positive, got -1.0"),
]


def problems_of(data: dict) -> list[str]:
    with pytest.raises(RecipeError) as info:
        parse_recipe(data)
    return info.value.problems


@pytest.fixture(scope="module")
def sd3_base(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd3", family="sd3")


@pytest.mark.parametrize("strategy, message", STRATEGY_CASES)
def test_a_strategy_key_out_of_its_bounds_is_the_one_problem(strategy, message, tiny_base, concept_dir, tmp_path):
    assert problems_of(recipe_dict(tiny_base, concept_dir, tmp_path / "out", strategy=strategy)) == [message]


@pytest.mark.parametrize("family, model, message", MODEL_CASES)
def test_a_model_key_out_of_its_bounds_is_the_one_problem(family, model, message, tiny_base, sd3_base, concept_dir,
                                                           tmp_path):
    base = tiny_base if family == "sd" else sd3_base
    data = recipe_dict(base, concept_dir, tmp_path / "out", model={"family": family, **model})
    assert problems_of(data) == [message]


def test_finetune_validate_refuses_an_override_out_of_bounds(tiny_base, concept_dir, tmp_path, capsys):
    from finetune.cli import main

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(tiny_base, concept_dir, tmp_path / "out")))
    assert main(["validate", str(path)]) == 0
    capsys.readouterr()
    assert main(["validate", str(path), "strategy.conv_layers=true", "strategy.conv_rank=0"]) == 2
    assert "strategy.conv_rank: must be at least 1, got 0" in capsys.readouterr().err
