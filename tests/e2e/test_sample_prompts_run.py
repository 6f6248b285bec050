"""A run whose sample prompts come from a kohya prompt file with settings of their own (issue 36, item 4): the grid
drawn while training is what the user's pipeline draws with those settings, rows of different sizes together; the
summary says where the prompts came from; report.html labels each row with its settings."""
from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image

from finetune.recipe.load import parse_recipe
from finetune.training.loop import train
from finetune.training.sample_prompts import SamplePrompt
from finetune.training.sampling import draw_grid
from tests.helpers import recipe_dict

PROMPT_FILE = "# rows of the grid\na purple sks\na red circle --n blurry --w 48 --h 24 --d 11 --s 3 --l 2 --ss ddim\n"


def test_a_prompt_files_settings_draw_the_grid_and_label_its_rows(tiny_base, concept_dir, tmp_path, caplog):
    import finetune
    from diffusers import StableDiffusionPipeline

    (tmp_path / "prompts.txt").write_text(PROMPT_FILE)
    out = tmp_path / "out"
    sample = {"every": 1, "prompt_file": "prompts.txt", "steps": 2, "guidance_scale": 3.0, "seed": 5,
              "images_per_prompt": 2}
    with caplog.at_level(logging.INFO):
        artifact = train(parse_recipe(recipe_dict(tiny_base, concept_dir, out, train={"max_steps": 1},
                                                  sample=sample), base_dir=tmp_path))
    assert (f"samples: 2 prompt(s) from {tmp_path / 'prompts.txt'}, 1 with settings of their own; sizes 32x32, "
            "48x24") in caplog.text
    assert f"{tmp_path / 'prompts.txt'}:3: --ss" in caplog.text  # kohya's sampler flag: ignored, said so

    drawn = Image.open(out / "samples" / "step-000001.png")
    assert drawn.size == (2 * 48, 32 + 24)  # columns as wide as the widest image, each row its own height
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_base), dtype=torch.float32)
    finetune.load_adapter(pipe, artifact)
    users = draw_grid(pipe, [SamplePrompt("a purple sks", "", 5, 2, 3.0, 32, 32),
                             SamplePrompt("a red circle", "blurry", 11, 3, 2.0, 48, 24)], images_per_prompt=2)
    np.testing.assert_array_equal(np.asarray(drawn), np.asarray(users))

    page = (out / "report.html").read_text()
    assert '<span class="prompt">a purple sks</span><span class="note">seed 5</span>' in page
    assert ('<span class="prompt">a red circle</span><span class="note">seed 11 · 3 steps · guidance 2 · 48x24 · '
            "negative: blurry</span>") in page
