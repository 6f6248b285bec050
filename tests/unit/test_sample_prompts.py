"""Per-prompt sample settings (finetune/training/sample_prompts.py): kohya's prompt files parsed, each prompt's
settings reaching the pipeline, rows of different sizes in one grid, and the labels that name each row's settings."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.recipe.load import RecipeError, parse_recipe
from finetune.recipe.schema import SampleOptions
from finetune.report.grids import labelled_grid
from finetune.training.sample_prompts import (Defaults, PromptProblem, SamplePrompt, checked_prompts, grid_labels,
                                              parse_line, read_prompt_file, resolve, row_note)
from finetune.training.sampling import draw_grid, image_grid, rows_grid, sample_grid
from tests.helpers import recipe_dict

DEFAULTS = Defaults(negative_prompt="", seed=10, steps=25, guidance=7.5, width=64, height=64)


def test_a_kohya_line_gives_every_setting():
    entry, notes = parse_line("a cat, sitting --n blurry, low quality --w 512 --h 768 --d 42 --s 30 --l 6.5",
                              "prompts.txt:1")
    assert entry == {"prompt": "a cat, sitting", "negative_prompt": "blurry, low quality", "width": 512,
                     "height": 768, "seed": 42, "steps": 30, "guidance": 6.5}
    assert notes == []


def test_kohya_flags_without_a_counterpart_are_ignored_with_a_note_and_g_wins_over_l():
    entry, notes = parse_line("a dog --ss euler_a --l 1.0 --g 3.5 --fs 3", "p.txt:4")
    assert entry == {"prompt": "a dog", "guidance": 3.5}
    assert any("p.txt:4: --ss" in note and "ignored" in note for note in notes)
    assert any("--fs" in note for note in notes)
    assert any("--l 1 ignored" in note for note in notes)


@pytest.mark.parametrize("line, says", [("a dog --x 3", "p.txt:2: unknown flag --x; the flags read are --n, --w"),
                                        ("a dog --w wide", "p.txt:2: --w takes a whole number (width), got 'wide'"),
                                        ("a dog --l high", "--l takes a number (guidance)")])
def test_an_unknown_flag_or_a_bad_value_is_refused_naming_the_line(line, says):
    with pytest.raises(PromptProblem) as caught:
        parse_line(line, "p.txt:2")
    assert says in str(caught.value)


def test_a_txt_file_skips_comments_and_blank_lines_and_names_lines_by_number(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# my prompts\n\na red circle --d 3\n  \na blue square --s 12 --ss ddim\n")
    entries, notes = read_prompt_file(path)
    assert [(e["_where"], e["prompt"]) for e in entries] == [(f"{path}:3", "a red circle"),
                                                             (f"{path}:5", "a blue square")]
    assert entries[0]["seed"] == 3 and entries[1]["steps"] == 12
    assert len(notes) == 1 and f"{path}:5: --ss" in notes[0]


def test_toml_and_json_files_as_kohya_writes_them(tmp_path):
    toml = tmp_path / "prompts.toml"
    toml.write_text('[prompt]\nwidth = 48\nsample_steps = 9\nscale = 4.0\n\n[[prompt.subset]]\nprompt = "a cat"\n\n'
                    '[[prompt.subset]]\nprompt = "a dog"\nwidth = 32\nseed = 5\n')
    rows = resolve(read_prompt_file(toml)[0], DEFAULTS)
    assert rows == [SamplePrompt("a cat", "", 10, 9, 4.0, 48, 64), SamplePrompt("a dog", "", 5, 9, 4.0, 32, 64)]
    js = tmp_path / "prompts.json"
    js.write_text(json.dumps(["a cat --d 1", {"prompt": "a dog", "guidance_scale": 2, "height": 32}]))
    rows = resolve(read_prompt_file(js)[0], DEFAULTS)
    assert rows == [SamplePrompt("a cat", "", 1, 25, 7.5, 64, 64), SamplePrompt("a dog", "", 11, 25, 2.0, 64, 32)]


@pytest.mark.parametrize("name, text, says", [("p.yaml", "a", "should end in .txt, .toml, .json"),
                                              ("p.json", "{", "is not a prompt file kohya would read"),
                                              ("p.toml", "[other]\n", "expected a [prompt] table"),
                                              ("p.txt", "# only a comment\n", "holds no prompt")])
def test_a_malformed_prompt_file_is_refused_naming_it(tmp_path, name, text, says):
    (tmp_path / name).write_text(text)
    with pytest.raises(PromptProblem) as caught:
        read_prompt_file(tmp_path / name)
    assert says in str(caught.value) and name in str(caught.value)


def test_strings_and_mappings_take_the_recipe_settings_they_do_not_set():
    sample = SampleOptions(prompts=["a cat", {"prompt": "a dog", "steps": 3, "width": 32, "negative_prompt": "x"}],
                           seed=10, steps=25, guidance_scale=7.5)
    rows, notes, problems = checked_prompts(sample, 64, 8, "")
    assert problems == [] and notes == []
    assert rows == [SamplePrompt("a cat", "", 10, 25, 7.5, 64, 64), SamplePrompt("a dog", "x", 11, 3, 7.5, 32, 64)]


@pytest.mark.parametrize("entry, says", [
    ({"prompt": "a", "cfg": 3}, "sample.prompts[0]: unknown key cfg; the keys are prompt, negative_prompt, seed"),
    ({"negative_prompt": "x"}, "sample.prompts[0]: needs `prompt`"),
    ({"prompt": "a", "steps": 0}, "steps should be a whole number of at least 1, got 0"),
    ({"prompt": "a", "seed": True}, "seed should be a whole number of at least 0, got True"),
    ({"prompt": "a", "guidance": -1}, "guidance should be a number of 0 or more"),
    ({"prompt": "a", "width": 60}, "sample.prompts[0]: width 60 must be a multiple of 8 (why); try 64")])
def test_a_bad_mapping_is_refused_naming_the_prompt_and_the_fix(entry, says):
    problems = checked_prompts(SampleOptions(prompts=[entry]), 64, 8, "why")[2]
    assert len(problems) == 1 and says in problems[0]


def test_prompts_and_a_prompt_file_together_are_refused():
    problems = checked_prompts(SampleOptions(prompts=["a"], prompt_file="p.txt"), 64, 8, "")[2]
    assert problems and "both given; keep one" in problems[0]


def test_validate_reads_the_prompt_file_beside_the_recipe_and_checks_sizes_against_the_base(tiny_base, concept_dir,
                                                                                             tmp_path):
    (tmp_path / "prompts.txt").write_text("a purple sks --w 30\n")
    data = recipe_dict(tiny_base, concept_dir, tmp_path / "out", sample={"every": 1, "prompt_file": "prompts.txt"})
    with pytest.raises(RecipeError) as caught:
        parse_recipe(data, base_dir=tmp_path)  # relative to the recipe's folder, as every path key
    assert f"{tmp_path / 'prompts.txt'}:1: width 30 must be a multiple of 4 (this base's VAE downsamples by 4)" \
        in str(caught.value)


class RecordingPipeline:
    """Takes what a diffusers text-to-image pipeline takes and records it; each image is one colour drawn from the
    generator it was given, at the size asked."""

    def __init__(self):
        self.calls = []

    def set_progress_bar_config(self, **_):
        pass

    def __call__(self, prompt=None, negative_prompt=None, num_inference_steps=50, guidance_scale=7.5,
                 num_images_per_prompt=1, height=None, width=None, generator=None):
        self.calls.append({"prompt": prompt, "negative_prompt": negative_prompt, "steps": num_inference_steps,
                           "guidance": guidance_scale, "size": (width, height), "seed": generator.initial_seed()})
        colours = torch.randint(0, 256, (num_images_per_prompt, 3), generator=generator)
        images = [Image.new("RGB", (width, height), tuple(c.tolist())) for c in colours]
        return type("Output", (), {"images": images})()


def test_each_prompts_settings_reach_the_pipeline():
    rows = [SamplePrompt("a cat", "", 10, 25, 7.5, 64, 64), SamplePrompt("a dog", "blurry", 42, 3, 2.0, 32, 48)]
    pipe = RecordingPipeline()
    grid = draw_grid(pipe, rows, images_per_prompt=2)
    assert pipe.calls == [
        {"prompt": "a cat", "negative_prompt": None, "steps": 25, "guidance": 7.5, "size": (64, 64), "seed": 10},
        {"prompt": "a dog", "negative_prompt": "blurry", "steps": 3, "guidance": 2.0, "size": (32, 48), "seed": 42}]
    assert grid.size == (128, 112)  # columns as wide as the widest image; each row as tall as its own


def test_string_prompts_draw_what_they_drew_before():
    """sample_grid (one setting for all, prompt i from seed + i) is draw_grid with those rows: same calls."""
    old, new = RecordingPipeline(), RecordingPipeline()
    grid = sample_grid(old, ["a", "b"], negative_prompt="", steps=4, guidance_scale=3.0, seed=7,
                       images_per_prompt=2, resolution=32)
    assert [c["seed"] for c in old.calls] == [7, 8] and all(c["size"] == (32, 32) for c in old.calls)
    again = draw_grid(new, [SamplePrompt(p, "", 7 + i, 4, 3.0, 32, 32) for i, p in enumerate("ab")], 2)
    assert old.calls == new.calls and np.array_equal(np.asarray(grid), np.asarray(again))


def test_rows_of_one_size_lay_out_as_before_and_smaller_images_sit_centred_in_their_cells():
    colours = ["red", "green", "blue", "white"]
    same = [[Image.new("RGB", (8, 8), c) for c in colours[:2]], [Image.new("RGB", (8, 8), c) for c in colours[2:]]]
    assert np.array_equal(np.asarray(rows_grid(same)), np.asarray(image_grid(same[0] + same[1], columns=2)))
    mixed = rows_grid([[Image.new("RGB", (8, 8), "red")], [Image.new("RGB", (4, 2), "blue")]])
    pixels = np.asarray(mixed)
    assert mixed.size == (8, 10)
    assert (pixels[8:10, 2:6] == [0, 0, 255]).all()  # the 4x2 image centred in its 8-wide cell
    assert (pixels[8:10, :2] == 255).all() and (pixels[8:10, 6:] == 255).all()  # white padding beside it


def test_a_real_pipeline_draws_a_prompt_as_a_direct_call_with_its_settings(tiny_base):
    from tests.helpers import pipeline

    pipe = pipeline(tiny_base)
    row = SamplePrompt("a red circle", "blurry", 11, 3, 2.0, 48, 24)
    grid = draw_grid(pipe, [row], images_per_prompt=2)
    direct = pipe(prompt="a red circle", negative_prompt="blurry", num_inference_steps=3, guidance_scale=2.0,
                  num_images_per_prompt=2, height=24, width=48, generator=torch.Generator().manual_seed(11)).images
    assert np.array_equal(np.asarray(grid), np.asarray(image_grid(direct, columns=2)))
    other = draw_grid(pipe, [SamplePrompt("a red circle", "blurry", 11, 4, 2.0, 48, 24)], images_per_prompt=2)
    assert not np.array_equal(np.asarray(grid), np.asarray(other))  # the steps did reach the pipeline


def test_a_rows_label_names_its_seed_and_each_setting_that_differs_from_the_recipes():
    assert row_note(SamplePrompt("a", "", 10, 25, 7.5, 64, 64), DEFAULTS) == "seed 10"
    assert (row_note(SamplePrompt("a", "blurry", 3, 40, 4.0, 64, 96), DEFAULTS)
            == "seed 3 · 40 steps · guidance 4 · 64x96 · negative: blurry")


def test_the_report_labels_rows_of_different_heights_with_their_settings(tmp_path):
    rows = (SamplePrompt("a cat", "", 10, 25, 7.5, 64, 64), SamplePrompt("a dog", "", 4, 25, 7.5, 64, 32))
    path = tmp_path / "step-000001.png"
    rows_grid([[Image.new("RGB", (r.width, r.height), "red")] * 2 for r in rows]).save(path)
    labels = grid_labels(rows, DEFAULTS)
    html = labelled_grid(path, labels["prompts"], labels["notes"], ["image 1", "image 2"], "step 1",
                         row_heights=labels["heights"])
    assert "unlabelled" not in html
    assert "grid-template-rows:auto 128px 64px" in html  # 64 px cells shown at 128 px, the 32 px row at 64
    assert '<span class="prompt">a dog</span><span class="note">seed 4 · 64x32</span>' in html
    wrong = labelled_grid(path, labels["prompts"], labels["notes"], ["image 1", "image 2"], "step 1",
                          row_heights=[64, 64])
    assert "unlabelled" in wrong  # heights that do not add up to the PNG's: not labelled wrongly
