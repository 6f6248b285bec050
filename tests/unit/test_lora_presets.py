"""strategy.target_preset (finetune/strategies/lora_presets.py): what validate and the strategy's check refuse, by
name. Which modules each Flux preset adapts, and their kohya files, are in test_kohya_flux.py."""
from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import save_file

from finetune.cli import main
from finetune.models import family_for
from finetune.models.tiny import save_tiny_pipeline
from finetune.recipe.load import parse_recipe
from tests.helpers import draw_concept, recipe_dict


@pytest.fixture(scope="module")
def flux_base(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-flux", family="flux")


def test_validate_refuses_an_unknown_preset_a_preset_with_target_modules_and_one_on_sd(flux_base, tiny_base,
                                                                                       tmp_path, capsys):
    images = draw_concept(tmp_path / "images", count=1)
    path = tmp_path / "r.yaml"

    def validate(base, **strategy):
        path.write_text(yaml.safe_dump(recipe_dict(base, images, tmp_path / "out",
                                                   strategy={"kind": "lora", **strategy})))
        return main(["validate", str(path)]), capsys.readouterr().err

    code, err = validate(flux_base, target_preset="mlp_only")
    assert code == 2 and "strategy.target_preset: flux has no preset 'mlp_only'; one of attention, " \
                          "attention_mlp, all_linear" in err
    code, err = validate(flux_base, target_preset="attention", target_modules=["to_q"])
    assert code == 2 and "strategy.target_preset: set together with strategy.target_modules" in err
    code, err = validate(tiny_base, target_preset="attention")
    assert code == 2 and "strategy.target_preset: sd has no target presets; remove it" in err
    start = tmp_path / "start.safetensors"
    save_file({"lora_unet_img_in.lora_down.weight": torch.zeros(1, 16)}, str(start))
    code, err = validate(flux_base, target_preset="attention", initial_weights=str(start))
    assert code == 2 and "the file decides which layers train; remove strategy.target_modules / target_preset" in err
    assert validate(flux_base, target_preset="all_linear")[0] == 0


def test_validate_leaves_a_hub_ids_preset_to_check():
    """A hub id's family is told when it loads (check refuses a preset it lacks, below); validate does not guess
    Stable Diffusion for it, and model.family, when set, is enough."""
    from types import SimpleNamespace

    from finetune.strategies.lora_presets import preset_problems

    def recipe(family):
        return SimpleNamespace(model=SimpleNamespace(family=family, base="some-user/some-model"))

    assert preset_problems("attention", [], recipe("auto")) == []
    assert preset_problems("attention", [], recipe("flux")) == []
    assert "sdxl has no target presets" in preset_problems("attention", [], recipe("sdxl"))[0]


@pytest.mark.parametrize("family_name, strategy, message", [
    ("sd", {"target_preset": "attention"}, "strategy.target_preset: sd has no target presets"),
    ("flux", {"variant": "loha", "formats": ["diffusers", "kohya"]}, "kohya's Flux layout fuses q/k/v, and a loha"),
])
def test_check_refuses_what_it_cannot_do_before_training(family_name, strategy, message, flux_base, tiny_base):
    from finetune.strategies import create_strategy
    from finetune.strategies.base import StrategySetupError

    # the recipe passes validate on Flux; check meets the model loaded (validate cannot tell a hub id's family)
    options = parse_recipe(recipe_dict(flux_base, ".", "out", strategy={"kind": "lora", **strategy})).strategy
    family = family_for(family_name)
    with pytest.raises(StrategySetupError, match=message):
        create_strategy(options).check(family, family.load(str(flux_base if family_name == "flux" else tiny_base)))
