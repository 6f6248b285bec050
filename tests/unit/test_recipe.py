"""Recipes are validated whole, before any model loads, with messages that say what to fix."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune.recipe.load import RecipeError, load_recipe, parse_recipe
from tests.helpers import recipe_dict

ROOT = Path(__file__).resolve().parents[2]


def problems_of(data: dict) -> list[str]:
    with pytest.raises(RecipeError) as info:
        parse_recipe(data)
    return info.value.problems


def test_good_recipe_parses_with_defaults(tiny_base, concept_dir, tmp_path):
    recipe = parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "out"))
    assert recipe.strategy.kind == "lora" and recipe.strategy.rank == 4 and recipe.strategy.alpha == 8
    assert recipe.train.max_steps == 4 and recipe.train.gradient_accumulation_steps == 1
    assert recipe.strategy.target_modules == []  # the family's defaults apply later


def test_unknown_key_names_the_closest_valid_key(tiny_base, concept_dir, tmp_path):
    data = recipe_dict(tiny_base, concept_dir, tmp_path / "out", train={"max_step": 10})
    data["strategy"]["rnak"] = 8
    problems = problems_of(data)
    assert any("train.max_step" in p and "did you mean 'train.max_steps'" in p for p in problems)
    assert any("strategy.rnak" in p and "did you mean 'strategy.rank'" in p for p in problems)


def test_wrong_types_are_named(tiny_base, concept_dir, tmp_path):
    data = recipe_dict(tiny_base, concept_dir, tmp_path / "out",
                       train={"max_steps": "many", "mixed_precision": "fp8", "gradient_checkpointing": "yes"})
    problems = problems_of(data)
    assert any(p.startswith("train.max_steps: expected an integer") for p in problems)
    assert any("train.mixed_precision" in p and "'bf16'" in p for p in problems)
    assert any(p.startswith("train.gradient_checkpointing: expected true/false") for p in problems)


def test_float_written_without_a_dot_is_accepted(tiny_base, concept_dir, tmp_path):
    text = yaml.safe_dump(recipe_dict(tiny_base, concept_dir, tmp_path / "out")).replace("0.001", "1e-3")
    assert "1e-3" in text
    assert parse_recipe(yaml.safe_load(text)).train.learning_rate == pytest.approx(1e-3)


def test_missing_paths_and_sections(tmp_path):
    problems = problems_of({"model": {"base": str(tmp_path / "nowhere")}, "strategy": {"kind": "lora"},
                            "data": {"images": str(tmp_path / "no-images")}})
    assert any("model.base" in p and "does not exist" in p for p in problems)
    assert any("data.images" in p and "not an existing folder" in p for p in problems)
    assert any(p.startswith("output_dir: required") for p in problems)
    assert any(p.startswith("strategy: missing") for p in problems_of({"model": {"base": "a/b"}}))


def test_folder_that_is_not_a_pipeline(tmp_path, concept_dir):
    (tmp_path / "empty").mkdir()
    problems = problems_of(recipe_dict(tmp_path / "empty", concept_dir, tmp_path / "out"))
    assert any("not a diffusers pipeline" in p for p in problems)


def test_hub_id_is_accepted_without_network(concept_dir, tmp_path):
    recipe = parse_recipe(recipe_dict(Path("stable-diffusion-v1-5/stable-diffusion-v1-5"), concept_dir,
                                      tmp_path / "out"))
    assert recipe.model.base == "stable-diffusion-v1-5/stable-diffusion-v1-5"


def test_contradictory_options(tiny_base, concept_dir, tmp_path):
    data = recipe_dict(tiny_base, concept_dir, tmp_path / "out", sample={"every": 5},
                       model={"base": str(tiny_base), "dtype": "fp16"})
    data["strategy"]["text_encoder_learning_rate"] = 1e-4
    problems = problems_of(data)
    assert any("sample.prompts is empty" in p for p in problems)
    assert any("model.dtype" in p and "mixed_precision: fp16" in p for p in problems)
    assert any("strategy.text_encoder is false" in p for p in problems)


def test_out_of_range_values(tiny_base, concept_dir, tmp_path):
    data = recipe_dict(tiny_base, concept_dir, tmp_path / "out",
                       train={"max_steps": 0, "learning_rate": -1.0}, data={"resolution": 30, "caption_dropout": 2})
    data["data"]["images"] = str(concept_dir)
    data["strategy"]["rank"] = 0
    problems = problems_of(data)
    for key in ("train.max_steps", "train.learning_rate", "data.resolution", "data.caption_dropout",
                "strategy.rank"):
        assert any(p.startswith(key) for p in problems), key
    assert any("try 32" in p for p in problems)


def test_output_dir_that_is_a_file(tiny_base, concept_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    assert any("output_dir" in p and "is a file" in p
               for p in problems_of(recipe_dict(tiny_base, concept_dir, tmp_path / "file")))


def test_unknown_strategy_kind_suggests_one(tiny_base, concept_dir, tmp_path):
    data = recipe_dict(tiny_base, concept_dir, tmp_path / "out")
    data["strategy"] = {"kind": "lorra"}
    assert any("did you mean 'lora'" in p for p in problems_of(data))


def test_overrides_and_relative_paths(tiny_base, concept_dir, tmp_path):
    data = recipe_dict(tiny_base, concept_dir, "out")
    data["data"]["images"] = "concept"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    (tmp_path / "concept").symlink_to(concept_dir)
    recipe = load_recipe(tmp_path / "r.yaml", ["train.max_steps=12", "strategy.rank=16", "log.to=[tensorboard]"])
    assert (recipe.train.max_steps, recipe.strategy.rank, recipe.log.to) == (12, 16, ["tensorboard"])
    assert Path(recipe.data.images) == tmp_path / "concept"  # resolved against the recipe's folder
    with pytest.raises(RecipeError, match="train.max_stepz"):
        load_recipe(tmp_path / "r.yaml", ["train.max_stepz=3"])


def test_validate_command_reports_every_problem_with_exit_2(tiny_base, concept_dir, tmp_path):
    data = recipe_dict(tiny_base, concept_dir, tmp_path / "out", train={"max_step": 3, "learning_rate": 0})
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(data))
    result = subprocess.run([sys.executable, "-m", "finetune", "validate", str(tmp_path / "bad.yaml")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "2 problems" in result.stderr and "train.max_steps" in result.stderr
    assert "train.learning_rate: must be positive" in result.stderr
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(recipe_dict(tiny_base, concept_dir, tmp_path / "out")))
    result = subprocess.run([sys.executable, "-m", "finetune", "validate", str(good)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "out").exists()  # validation writes nothing


# recipes/accelerate/ holds accelerate configs (launched in tests/e2e/test_fsdp.py), not recipes
@pytest.mark.parametrize("path", sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "accelerate" not in p.parts),
                         ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_every_shipped_recipe_validates(path, tiny_base):
    overrides = [f"model.base={tiny_base}"] if "tiny" in path.name else []
    recipe = load_recipe(path, overrides)
    from finetune.strategies import KINDS

    assert recipe.strategy.kind in KINDS
    assert recipe.train.max_steps > 0


def test_resolution_follows_the_bases_vae(tiny_base, concept_dir, tmp_path):
    # the tiny base's VAE has 3 blocks: it downsamples by 4, so 36 fits it though it is no multiple of 8
    assert parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "o", data={"resolution": 36}))
    # a hub id is not read before loading: Stable Diffusion's 8 is asked for, and said to be an assumption
    hub = recipe_dict(tiny_base, concept_dir, tmp_path / "o", data={"resolution": 36})
    hub["model"]["base"] = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    with pytest.raises(RecipeError, match=r"multiple of 8 \(Stable Diffusion's VAE downsamples by 8; the base's "
                                          r"own is read when it loads\); try 32"):
        parse_recipe(hub)


def test_a_path_is_relative_to_where_it_was_written(tiny_base, concept_dir, tmp_path, monkeypatch):
    recipes = tmp_path / "project" / "recipes"
    recipes.mkdir(parents=True)
    (tmp_path / "project" / "data").symlink_to(concept_dir)
    data = recipe_dict(tiny_base, concept_dir, "../runs/a")  # output_dir: not there yet
    data["data"]["images"] = "../data"
    (recipes / "r.yaml").write_text(yaml.safe_dump(data))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # in the file: against the recipe's folder, whatever the working directory
    recipe = load_recipe(recipes / "r.yaml")
    assert recipe.output_dir == str(tmp_path / "project" / "runs" / "a")
    assert recipe.data.images == str(tmp_path / "project" / "data")
    # on the command line: against the working directory, like any shell argument
    recipe = load_recipe(recipes / "r.yaml", ["output_dir=runs/b", f"data.images={concept_dir}"])
    assert recipe.output_dir == str(elsewhere / "runs" / "b")
    # owner/name is a hub id unless such a folder is there
    assert load_recipe(recipes / "r.yaml", ["model.base=some-owner/some-model"]).model.base == "some-owner/some-model"
    (elsewhere / "some-owner").mkdir()
    (elsewhere / "some-owner" / "some-model").symlink_to(tiny_base)
    assert load_recipe(recipes / "r.yaml", ["model.base=some-owner/some-model"]).model.base == str(
        elsewhere / "some-owner" / "some-model")


@pytest.mark.parametrize("override, expected", [("train.mixed_precision=no", "no"), ("cache.text=off", "off"),
                                                ("cache.text=on", "on")])
def test_yaml_booleans_spell_the_choices_they_look_like(tiny_base, concept_dir, tmp_path, override, expected):
    """`mixed_precision=no` on the command line (or `no` unquoted in a file) is YAML's false: it means "no"."""
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe_dict(tiny_base, concept_dir, tmp_path / "out")))
    recipe = load_recipe(tmp_path / "r.yaml", [override])
    section, key = override.split("=")[0].split(".")
    assert getattr(getattr(recipe, section), key) == expected
