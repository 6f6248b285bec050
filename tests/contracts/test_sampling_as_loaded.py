"""Sample grids drawn while training are what a user's pipeline draws after loading the artifact (issue 32,
case 18-bf16-sample-grids): in bf16 no grid crashed on a VAE in bf16 given fp32 latents, on every family and
strategy, and the grid equals, pixel for pixel, the one the base loaded in the same dtype draws with the artifact.
Textual inversion in bf16 trains on a CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.models import specs
from finetune.models.tiny import save_tiny_pipeline
from finetune.recipe.load import parse_recipe
from finetune.training.loop import train
from finetune.training.sampling import sample_grid
from tests.helpers import CONTRACT, NOT_YET, recipe_dict

DTYPES = {"no": torch.float32, "bf16": torch.bfloat16}
SAMPLE = {"every": 2, "prompts": ["a purple sks", "a purple <sks>"], "steps": 2, "guidance_scale": 3.0, "seed": 7,
          "negative_prompt": "blurry"}


@pytest.fixture(scope="module")
def tiny_bases(tiny_base, tmp_path_factory):
    return {name: tiny_base if name == "sd" else save_tiny_pipeline(tmp_path_factory.mktemp(name) / "base",
                                                                     family=name) for name in specs()}


def _train(base, images, out, kind: str, precision: str, steps: int = 2):
    """`steps` steps of the strategy's contract settings, a grid drawn at the last one; returns the artifact."""
    from finetune.models import family_told
    from tests.helpers import allowed_by

    contract = CONTRACT[kind]
    strategy = allowed_by(family_told("auto", str(base)).spec, contract.options)
    return train(parse_recipe(recipe_dict(base, images, out, strategy=strategy,
                                          train={"max_steps": steps, "mixed_precision": precision,
                                                 "learning_rate": contract.learning_rate},
                                          sample={**SAMPLE, "every": steps})))


def _users_grid(base, artifact, dtype: torch.dtype) -> Image.Image:
    """diffusers' own pipeline, loaded in `dtype`, with the artifact loaded as docs/formats.md says (None: the base
    alone)."""
    from diffusers import StableDiffusionPipeline

    import finetune

    if artifact is not None and (artifact / "model_index.json").is_file():  # DreamBooth: the saved pipeline
        pipe = StableDiffusionPipeline.from_pretrained(str(artifact), dtype=dtype)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(str(base), dtype=dtype)
        if artifact is not None:
            finetune.load_adapter(pipe, artifact)
    settings = {k: v for k, v in SAMPLE.items() if k != "every"}
    return sample_grid(pipe, **settings, images_per_prompt=1, resolution=32)


@pytest.mark.parametrize("precision", ["no", "bf16"])
@pytest.mark.parametrize("kind", sorted(CONTRACT))
def test_the_grid_drawn_while_training_is_what_the_users_pipeline_draws(kind, precision, tiny_base, concept_dir,
                                                                          tmp_path):
    artifact = _train(tiny_base, concept_dir, tmp_path / "out", kind, precision)
    drawn = np.asarray(Image.open(tmp_path / "out" / "samples" / "step-000002.png"))
    users = np.asarray(_users_grid(tiny_base, artifact, DTYPES[precision]))
    assert drawn.shape == users.shape == (64, 32, 3)  # one row per prompt
    np.testing.assert_array_equal(drawn, users)
    # and the training shows in it: the base alone draws another grid
    base = np.asarray(_users_grid(tiny_base, None, DTYPES[precision]))
    assert not np.array_equal(drawn, base), "the trained weights did not reach the grid"


@pytest.mark.parametrize("family", [f for f in specs() if f != "sd"])
def test_on_every_family_the_bf16_grid_is_what_finetunes_loading_draws(family, tiny_bases, concept_dir, tmp_path):
    """The base loaded as `finetune sample` loads it (the family's loader: SDXL's VAE stays fp32, its config's
    force_upcast, and decodes latents of the U-Net's dtype), in bf16, with the LoRA loaded onto it."""
    import finetune
    from finetune.models import family_for

    artifact = _train(tiny_bases[family], concept_dir, tmp_path / "out", "lora", "bf16")
    loader = family_for(family)
    pipe = loader.pipeline(loader.load(str(tiny_bases[family]), dtype=torch.bfloat16))
    finetune.load_adapter(pipe, artifact)
    settings = {k: v for k, v in SAMPLE.items() if k != "every"}
    # with the family's sampling arguments, as `finetune sample` draws (Kontext: its base's T5 length, max_area)
    users = np.asarray(sample_grid(pipe, **settings, images_per_prompt=1, resolution=32,
                                   control=loader.sample_kwargs))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "samples" / "step-000002.png")), users)


@pytest.mark.parametrize("kind, family", [(k, f) for f in specs() for k in sorted(CONTRACT) if (k, f) not in NOT_YET],
                         ids=lambda value: value)
def test_bf16_training_draws_its_grids_on_every_family_and_strategy(kind, family, tiny_bases, concept_dir,
                                                                   tmp_path):
    """One step in bf16 on the CPU with a grid at that step (textual inversion trains in bf16 there too: its fp32
    vectors once met a bf16 layer norm, "mixed dtype (CPU)")."""
    artifact = _train(tiny_bases[family], concept_dir, tmp_path / "out", kind, "bf16", steps=1)
    assert artifact.exists()
    grid = Image.open(tmp_path / "out" / "samples" / "step-000001.png")
    assert grid.size == (32, 64)
