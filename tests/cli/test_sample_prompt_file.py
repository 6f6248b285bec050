"""`finetune sample --prompt-file` (issue 36, item 4): kohya's prompt file drawn row by row with its settings, the
command's options as its defaults; --prompt and --prompt-file are one or the other; `finetune validate` says where
a recipe's sample prompts come from."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from finetune.cli import main
from finetune.training.sample_prompts import SamplePrompt
from finetune.training.sampling import draw_grid
from tests.helpers import recipe_dict


def test_sample_draws_a_prompt_file_with_each_lines_settings(tiny_base, tmp_path):
    from diffusers import StableDiffusionPipeline

    (tmp_path / "prompts.txt").write_text("a purple sks\na red circle --w 48 --h 24 --d 9 --s 2 --n blurry\n")
    out = tmp_path / "grid.png"
    assert main(["sample", "--base", str(tiny_base), "--prompt-file", str(tmp_path / "prompts.txt"), "--out",
                 str(out), "--steps", "1", "--num", "1", "--seed", "3", "--guidance", "2.5", "--resolution", "32",
                 "--device", "cpu"]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_base), dtype=torch.float32)
    expected = draw_grid(pipe, [SamplePrompt("a purple sks", "", 3, 1, 2.5, 32, 32),
                                SamplePrompt("a red circle", "blurry", 9, 2, 2.5, 48, 24)], images_per_prompt=1)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(expected))


@pytest.mark.parametrize("prompts, says", [([], "give --prompt (once per row) or --prompt-file"),
                                           (["--prompt", "x", "--prompt-file", "p.txt"], "one of the two"),
                                           (["--prompt-file", "missing.txt"], "--prompt-file: missing.txt does not "
                                                                              "exist")])
def test_sample_takes_prompts_or_a_prompt_file(tiny_base, tmp_path, prompts, says, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["sample", "--base", str(tiny_base), *prompts, "--out", str(tmp_path / "g.png")]) == 2
    assert says in capsys.readouterr().err


def test_validate_says_where_the_sample_prompts_come_from(tiny_base, concept_dir, tmp_path, capsys):
    (tmp_path / "prompts.toml").write_text('[prompt]\nsample_steps = 4\n[[prompt.subset]]\nprompt = "a sks"\n'
                                           '[[prompt.subset]]\nprompt = "a dog"\nwidth = 64\n')
    data = recipe_dict(tiny_base, concept_dir, tmp_path / "out", sample={"every": 2, "prompt_file": "prompts.toml"})
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(data))
    assert main(["validate", str(tmp_path / "recipe.yaml")]) == 0
    assert (f"samples: 2 prompt(s) from {tmp_path / 'prompts.toml'}, 2 with settings of their own; sizes 32x32, "
            "64x32") in capsys.readouterr().out
