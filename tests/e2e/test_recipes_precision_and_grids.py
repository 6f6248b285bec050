"""Every shipped recipe's precision with sample grids on, on a tiny model of its family, on the CPU (issue 32):
bf16 with grids once stopped SD, SD3 and Flux runs at the first grid, and five shipped recipes combine the two
(the Flux recipes' comments suggest turning grids on). Each recipe runs as shipped (strategy, precision,
model.quantize, caches, sample prompts, guidance, seed) for one step, with a grid drawn at that step in one
sampling step; what only makes it big or long is made small. A recipe added under recipes/ is covered as it is.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from finetune.cli import main
from finetune.models.tiny import save_tiny_pipeline
from finetune.recipe.load import load_recipe

RECIPES_DIR = Path(__file__).parents[2] / "recipes"
# accelerate's launch configs live beside the recipes; they are no recipes
RECIPES = sorted(p for p in RECIPES_DIR.rglob("*.yaml") if "accelerate" not in p.relative_to(RECIPES_DIR).parts)
# accelerate has no fp16 autocast on a CPU (the loop refuses fp16 there): an fp16 recipe runs in bf16 here, the
# other half precision, which takes the same path through the loop (half base, fp32 trained weights, grids)
ON_A_CPU = {"fp16": "bf16"}
STAR_IMAGES = Path(__file__).parents[2] / "data_examples" / "star"
FALLBACK_PROMPT = "a purple sks"  # for a recipe that draws no grid as shipped


def test_every_recipe_is_found():
    assert len(RECIPES) >= 20 and any(p.parent.name == "shapes" for p in RECIPES)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """family -> a tiny pipeline folder, built on first use."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = save_tiny_pipeline(tmp_path_factory.mktemp(family) / "base", family=family)
        return built[family]
    return get


def overrides_for(path: Path, tiny_models, tmp_path: Path) -> tuple[list[str], int]:
    """(command-line overrides that run `path` small with a grid at step 1, the number of prompts it draws)."""
    model = yaml.safe_load(path.read_text())["model"]
    # the shapes recipes' own bases are in the repository, and tiny already; a hub id, or a folder the user makes
    # first (tiny_cpu_lora.yaml), gets a tiny pipeline of the recipe's family in its place
    replaced = not (path.parent / Path(model["base"]).expanduser()).exists()
    family = model.get("family", "auto")
    overrides = [f"model.base={tiny_models('sd' if family == 'auto' else family)}"] if replaced else []
    recipe = load_recipe(path, overrides)
    if replaced and recipe.strategy.kind == "textual_inversion":
        overrides.append("strategy.initializer_token=x")  # the tiny byte tokenizer splits real words
    if recipe.data.dataset and not Path(recipe.data.dataset).expanduser().exists():  # a hub dataset: local images
        overrides += ["data.dataset=null", f"data.images={STAR_IMAGES}"]
    precision = ON_A_CPU.get(recipe.train.mixed_precision, recipe.train.mixed_precision)
    prompts = list(recipe.sample.prompts) or [FALLBACK_PROMPT]
    overrides += [
        f"train.mixed_precision={precision}", "sample.every=1", "sample.steps=1", f"sample.prompts={json.dumps(prompts)}",
        "data.resolution=32", "train.max_steps=1", "train.batch_size=1", "train.gradient_accumulation_steps=1",
        "train.lr_warmup_steps=0", "checkpoint.every=0", "log.to=[]", f"output_dir={tmp_path / 'out'}",
        "prior.num_class_images=1", "prior.steps=1", f"prior.class_data_dir={tmp_path / 'class'}"]
    return overrides, len(prompts)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(RECIPES_DIR)))
def test_the_recipes_precision_draws_its_grid_on_a_tiny_model(path, tiny_models, tmp_path):
    overrides, prompts = overrides_for(path, tiny_models, tmp_path)
    assert main(["validate", str(path), *overrides]) == 0
    assert main(["train", str(path), *overrides]) == 0
    recipe = load_recipe(path, overrides)
    grid = Image.open(tmp_path / "out" / "samples" / "step-000001.png")
    # an edit recipe's rows show their control images before the results (training/control_images.py)
    controls = max(_control_count(prompt) for prompt in recipe.sample.prompts) if recipe.sample.prompts else 0
    assert grid.size == (32 * (controls + recipe.sample.images_per_prompt), 32 * prompts)
    assert (tmp_path / "out" / recipe_artifact(recipe)).exists()


def _control_count(prompt) -> int:
    """How many control images a sample.prompts entry names (a string names none)."""
    given = prompt.get("control_image") if isinstance(prompt, dict) else None
    return 0 if given is None else len(given) if isinstance(given, list) else 1


def recipe_artifact(recipe) -> str:
    from finetune.strategies import create_strategy

    return create_strategy(recipe.strategy).artifact_name
