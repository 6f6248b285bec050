"""`model.vae`: another VAE in place of the base's (a folder holding one, a pipeline folder, a single file, a hub
id), as people swap in a fine-tuned or fp16-safe VAE; what trains and what is sampled use it."""
from __future__ import annotations

import pytest
import torch

from finetune.models import ModelLoadError
from finetune.models.stable_diffusion import StableDiffusion
from finetune.models.tiny import save_tiny_pipeline
from finetune.recipe.load import RecipeError, parse_recipe
from tests.helpers import recipe_dict, train_keeping_parts


@pytest.fixture(scope="module")
def other_pipeline(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("other") / "pipe", seed=7)


def _same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("where", ["vae folder", "pipeline folder"])
def test_the_run_encodes_with_the_given_vae(where, tiny_base, other_pipeline, concept_dir, tmp_path):
    vae = other_pipeline / "vae" if where == "vae folder" else other_pipeline
    recipe = parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "out", train={"max_steps": 1},
                                      model={"base": str(tiny_base), "vae": str(vae)}))
    _, parts = train_keeping_parts(recipe)
    wanted = StableDiffusion().load(str(other_pipeline)).vae
    base_vae = StableDiffusion().load(str(tiny_base)).vae
    assert _same_weights(parts.vae, wanted) and not _same_weights(parts.vae, base_vae)


def test_a_missing_or_unloadable_vae_is_named_as_model_vae(tiny_base, concept_dir, tmp_path):
    with pytest.raises(RecipeError, match="model.vae: .* does not exist"):
        parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "out",
                                 model={"base": str(tiny_base), "vae": str(tmp_path / "nowhere")}))
    with pytest.raises(ModelLoadError,
                       match=r"(?s)could not load model.vae 'someone/no-such-vae'.*set model.vae to that folder"):
        StableDiffusion().load(str(tiny_base), vae="someone/no-such-vae")
