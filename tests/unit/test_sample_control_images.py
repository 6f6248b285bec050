"""Control images of sample prompts (finetune/training/control_images.py): `control_image` read from a mapping (one
path or a list), refused by name when a file is missing, unreadable, or more than the family takes (before any model
loads), and shown before each row's results in the grid."""
from __future__ import annotations

import numpy as np
import pytest
import yaml
from PIL import Image

from finetune.models import family_for
from finetune.training.control_images import count_problems, with_controls, with_given_controls
from finetune.training.sample_prompts import (Defaults, PromptProblem, SamplePrompt, grid_labels, resolve, row_note,
                                              summary_line)
from finetune.training.sampling import rows_grid
from tests.helpers import draw_concept, noise_image, recipe_dict

DEFAULTS = Defaults(negative_prompt="", seed=10, steps=25, guidance=7.5, width=32, height=32)


@pytest.fixture
def controls(tmp_path):
    paths = []
    for index, size in enumerate([(64, 32), (16, 16)]):
        path = tmp_path / f"control{index}.png"
        noise_image(*size, seed=index).save(path)
        paths.append(str(path))
    return paths


def test_control_image_takes_a_path_or_a_list_and_labels_the_row(controls):
    one, two = resolve([{"prompt": "edit", "control_image": controls[0]},
                        {"prompt": "edit", "control_image": controls}], DEFAULTS)
    assert one.control_images == (controls[0],) and two.control_images == tuple(controls)
    assert row_note(two, DEFAULTS) == "seed 11 · control: control0.png, control1.png"
    plain = resolve([{"prompt": "edit"}], DEFAULTS)[0]
    assert plain.control_images == () and row_note(plain, DEFAULTS) == "seed 10"
    assert "2 with control images" in summary_line([one, two, plain], DEFAULTS, None)


@pytest.mark.parametrize("value, says", [
    ("missing.png", "sample.prompts[0]: control_image: missing.png does not exist; give the path of an image file"),
    (["ok", 3], "sample.prompts[0]: control_image should be an image file's path or a list of paths"),
    ([], "sample.prompts[0]: control_image should be an image file's path or a list of paths"),
    ("text", "sample.prompts[0]: control_image: {path} is not an image PIL can read")])
def test_a_control_image_that_cannot_be_read_is_named(tmp_path, value, says):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    value = str(text) if value == "text" else value
    with pytest.raises(PromptProblem, match=None) as refused:
        resolve([{"_where": "sample.prompts[0]", "prompt": "edit", "control_image": value}], DEFAULTS)
    assert says.format(path=text) in str(refused.value)


def test_more_control_images_than_the_family_takes_are_refused_by_name(controls):
    entries = [{"_where": "sample.prompts[0]", "prompt": "a", "control_image": controls[0]},
               {"_where": "sample.prompts[1]", "prompt": "b", "control_image": controls},
               {"_where": "sample.prompts[2]", "prompt": "c"}]
    sd, = count_problems(entries[:1], family_for("sd"))
    assert sd.startswith("sample.prompts[0]: control_image: Stable Diffusion 1.x/2.x (sd) is no edit model")
    assert "remove control_image" in sd and "flux_kontext" in sd
    kontext, = count_problems(entries, family_for("flux_kontext"))
    assert kontext.startswith("sample.prompts[1]: control_image: Flux.1 Kontext takes at most 1 control image(s)")
    assert count_problems(entries, family_for("flux2")) == []


def test_the_command_lines_control_images_go_to_entries_without_their_own(controls):
    entries = [{"_where": "p[0]", "prompt": "a"}, {"_where": "p[1]", "prompt": "b", "control_image": controls[1]}]
    given = with_given_controls(entries, [f"{controls[0]},{controls[1]}"], "--control")
    assert given[0]["control_image"] == controls and given[1]["control_image"] == controls[1]
    assert with_given_controls(entries, None, "--control") == entries
    with pytest.raises(ValueError, match="--control: control_image: nowhere.png does not exist"):
        with_given_controls(entries[:1], ["nowhere.png"], "--control")


def test_the_grid_shows_each_rows_control_images_before_its_results(controls):
    """Control images shrunk (aspect kept) to the results' size, in the first columns; a row with fewer keeps
    its results in the same columns (white cells before them)."""
    red, blue = Image.new("RGB", (32, 32), "red"), Image.new("RGB", (32, 32), "blue")
    rows = with_controls([[red, red], [blue, blue]], [controls, ()])
    assert [len(row) for row in rows] == [4, 4] and rows[1][:2] == [None, None]
    assert rows[0][0].size == (32, 16) and rows[0][1].size == (16, 16)  # 64x32 shrunk to fit; 16 px not enlarged
    grid = np.asarray(rows_grid(rows))
    assert grid.shape == (64, 4 * 32, 3)
    assert (grid[32:, :64] == 255).all()  # the second row's empty control cells
    assert (grid[:32, 64:] == [255, 0, 0]).all() and (grid[32:, 64:] == [0, 0, 255]).all()
    control = np.asarray(Image.open(controls[0]).convert("RGB").resize((32, 16), Image.Resampling.BICUBIC))
    assert np.abs(grid[8:24, :32].astype(int) - control).mean() < 40  # the control image itself, shrunk
    assert with_controls([[red]], [()]) == [[red]]
    labels = grid_labels((SamplePrompt("a", "", 0, 1, 1.0, 32, 32, tuple(controls)),
                          SamplePrompt("b", "", 1, 1, 1.0, 32, 32)), DEFAULTS)
    assert labels["controls"] == 2


def test_validate_refuses_a_control_image_for_a_family_that_is_no_edit_model(tiny_base, controls, tmp_path,
                                                                              capsys):
    from finetune.cli import main

    recipe = recipe_dict(tiny_base, draw_concept(tmp_path / "images", count=1), tmp_path / "out",
                         sample={"every": 2, "prompts": [{"prompt": "x", "control_image": controls[0]}]})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["validate", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err
    assert "sample.prompts[0]: control_image: Stable Diffusion 1.x/2.x (sd) is no edit model" in err


def test_a_relative_control_image_is_read_where_it_was_written(tmp_path, monkeypatch):
    """In a recipe file: against the file's folder (as its other paths); in a prompt file: against that file's
    folder; in a command-line override: against the working directory."""
    from finetune.models.tiny import save_tiny_pipeline
    from finetune.recipe.load import load_recipe
    from finetune.training.sample_prompts import read_prompt_file

    tiny_base = save_tiny_pipeline(tmp_path / "kontext", family="flux_kontext")
    folder = tmp_path / "recipes"
    folder.mkdir()
    noise_image(32, 32).save(folder / "edit.png")
    recipe = recipe_dict(tiny_base, draw_concept(tmp_path / "images", count=1), tmp_path / "out",
                         sample={"every": 0, "prompts": [{"prompt": "x", "control_image": "edit.png"}, "y"]})
    (folder / "r.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(tmp_path)
    loaded = load_recipe(str(folder / "r.yaml"), [])
    assert loaded.sample.prompts == [{"prompt": "x", "control_image": str(folder / "edit.png")}, "y"]
    (folder / "prompts.json").write_text('[{"prompt": "x", "control_image": ["edit.png"]}]')
    entries, _ = read_prompt_file(folder / "prompts.json")
    assert entries[0]["control_image"] == [str(folder / "edit.png")]
    override = load_recipe(str(folder / "r.yaml"), ['sample.prompts=[{prompt: x, control_image: recipes/edit.png}]'])
    assert override.sample.prompts[0]["control_image"] == str(folder / "edit.png")
