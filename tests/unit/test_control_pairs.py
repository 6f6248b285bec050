"""Edit pairs (data.control): control images found by name in folders, from metadata.jsonl or a dataset column;
every bad pair refused before any model loads, naming the files; the recipe checks that keep a target and its
control images together."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune.data.control import slot_problem
from finetune.data.prepare import prepare_data
from finetune.data.sources import DataError
from finetune.models import specs
from finetune.recipe.load import RecipeError, parse_recipe
from finetune.recipe.schema import ControlOptions, DataOptions
from tests.helpers import draw_concept, recipe_dict


def _control(path: Path, level: int, size=(32, 32)) -> Path:
    """A gray control image whose level tells which it is once read back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (level, level, level)).save(path)
    return path


def _level(control) -> int:
    return int(np.asarray(control.load())[0, 0, 0])


def _prepared(images: Path, decode: bool = True, **control) -> list:
    d = DataOptions(images=str(images), resolution=32, control=ControlOptions(**control))
    return prepare_data(d, global_batch=1, decode=decode).examples


def test_folders_give_slots_by_mirrored_path_flat_stem_and_numbered_references(tmp_path):
    images = tmp_path / "images"
    draw_concept(images / "sub", count=2)  # sub/0.png, sub/1.png
    mirrored, flat = tmp_path / "mirrored", tmp_path / "flat"
    _control(mirrored / "sub" / "0.jpg", 10)  # a mirrored path with another suffix
    _control(mirrored / "sub" / "1.bmp", 11)
    _control(flat / "0_0.png", 20)  # several references, numbered, at the folder's top
    _control(flat / "0_1.png", 21)
    _control(flat / "1_0.png", 30)
    _control(flat / "1_1.png", 31)
    examples = _prepared(images, folders=[str(mirrored), str(flat)])
    assert [[_level(c) for c in e.controls] for e in examples] == [[10, 20, 21], [11, 30, 31]]
    assert [Path(c.name).name for c in examples[0].controls] == ["0.jpg", "0_0.png", "0_1.png"]
    assert examples[0].controls[0].size == (32, 32)


def test_metadata_column_takes_a_path_or_a_list(tmp_path):
    images = draw_concept(tmp_path / "images", count=2)
    _control(images.parent / "controls" / "a.png", 40)
    _control(images.parent / "controls" / "b.png", 50)
    lines = [{"file_name": "0.png", "text": "x", "control_image": "../controls/a.png"},
             {"file_name": "1.png", "text": "y", "control_image": ["../controls/b.png"]}]
    (images / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    examples = _prepared(images, column="control_image")
    assert [[_level(c) for c in e.controls] for e in examples] == [[40], [50]]


def test_dataset_column_holds_images_or_lists_of_them(tmp_path):
    datasets = pytest.importorskip("datasets")
    gray = [Image.new("RGB", (32, 32), (v, v, v)) for v in (60, 70, 80, 90)]
    folder = tmp_path / "ds"
    columns = {"image": gray[:2], "text": ["x", "y"], "edit": [[gray[2], gray[3]], [gray[3], gray[2]]]}
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                  "edit": [datasets.Image()]})
    datasets.Dataset.from_dict(columns, features=features).save_to_disk(str(folder))
    d = DataOptions(dataset=str(folder), resolution=32, control=ControlOptions(column="edit"))
    examples = prepare_data(d, global_batch=1).examples
    assert [[_level(c) for c in e.controls] for e in examples] == [[80, 90], [90, 80]]
    with pytest.raises(DataError, match="no column 'nope' in"):
        prepare_data(replace(d, control=ControlOptions(column="nope")), global_batch=1)


def _pairs(tmp_path: Path) -> tuple[Path, Path]:
    images = draw_concept(tmp_path / "images")
    controls = tmp_path / "controls"
    for i in range(4):
        _control(controls / f"{i}.png", 10 * i)
    return images, controls


@pytest.mark.parametrize("decode", [False, True])
@pytest.mark.parametrize("case, says", [
    ("missing", "2.png: no control image 2.* (or 2_0.*, 2_1.*, ... for several) in"),
    ("orphan", "9.png: no training image 9.* in data.images"),
    ("unreadable", "2.png (control of"),
    ("uneven", "3.png has 2 control image(s) (3_0.png, 3_1.png) where 3 other image(s) have 1"),
    ("gap", "its references in"),
    ("ambiguous", "1.png: several control images match it in"),
    ("both", "holds both 0.png and numbered references (0_0.png)"),
])
def test_bad_pairs_are_refused_naming_the_files(tmp_path, case, says, decode):
    images, controls = _pairs(tmp_path)
    if case == "missing":
        (controls / "2.png").unlink()
    elif case == "orphan":
        _control(controls / "9.png", 1)
    elif case == "unreadable":
        (controls / "2.png").write_bytes(b"not a png")
    elif case == "uneven":
        (controls / "3.png").unlink()
        _control(controls / "3_0.png", 1), _control(controls / "3_1.png", 2)
    elif case == "gap":
        (controls / "3.png").unlink()
        _control(controls / "3_0.png", 1), _control(controls / "3_2.png", 2)
    elif case == "ambiguous":
        _control(controls / "1.jpg", 1)
    elif case == "both":
        _control(controls / "0_0.png", 1)
    with pytest.raises(DataError, match="data.control") as raised:
        _prepared(images, decode=decode, folders=[str(controls)])
    assert says in str(raised.value)
    assert "Fix: give every training image its control image" in str(raised.value)


def test_every_problem_is_named_at_once_and_a_skipped_images_control_is_no_orphan(tmp_path):
    images, controls = _pairs(tmp_path)
    (controls / "1.png").unlink()
    _control(controls / "7.png", 1)
    with pytest.raises(DataError) as raised:
        _prepared(images, folders=[str(controls)])
    assert "2 problem(s)" in str(raised.value) and "1.png: no control" in str(raised.value)
    assert "7.png: no training image 7.*" in str(raised.value)
    (controls / "7.png").unlink()
    _control(controls / "1.png", 1)
    (images / "3.png").write_bytes(b"broken")  # data.on_bad_image: skip leaves it out; its control is not an orphan
    d = DataOptions(images=str(images), resolution=32, on_bad_image="skip",
                    control=ControlOptions(folders=[str(controls)]))
    assert len(prepare_data(d, global_batch=1).examples) == 3


def test_a_family_taking_no_or_fewer_control_images_is_refused_naming_the_edit_families(monkeypatch):
    sd = specs()["sd"]
    monkeypatch.setitem(specs(), "flux", replace(specs()["flux"], control_images=2))
    edit = ", ".join(name for name, spec in specs().items() if spec.control_images)  # flux here, and the real ones
    assert "flux" in edit.split(", ") and len(edit.split(", ")) >= 2
    assert slot_problem(1, sd) == (
        "model.family sd takes no control images (Stable Diffusion 1.x/2.x is not an edit model), and data.control "
        f"gives them (1 per sample); edit families: {edit}. Set model.family to one of them, or remove data.control")
    assert "takes at most 2; give each image at most 2" in slot_problem(3, specs()["flux"])
    assert slot_problem(2, specs()["flux"]) is None


@pytest.mark.parametrize("data, prior, validation, says", [
    ({"control": {"folders": ["CONTROLS"], "column": "control_image"}}, {}, {}, "give exactly one of folders"),
    ({"control": {}}, {}, {}, "give exactly one of folders"),
    ({"control": {"folders": ["/no/such/folder"]}}, {}, {}, "/no/such/folder is not an existing folder"),
    ({"control": {"folders": ["INSIDE"]}}, {}, {}, "lies inside data.images"),
    ({"control": {"column": "control_image"}}, {}, {}, "has none; write one (file_name, text, control_image)"),
    ({"control": {"folders": ["CONTROLS"], "resolution": 64}}, {}, {}, "remove data.control.resolution"),
    ({"control": {"folders": ["CONTROLS"], "resize": "bucket", "resolution": 30}}, {}, {},
     "must be a multiple of 4 (the VAE's downsampling); try 32"),
    ({"control": {"folders": ["CONTROLS"], "resize": "bucket"}, "bucket_min_side": 256}, {}, {},
     "no bucket of the grid (data.bucket_step, data.bucket_min_side, data.bucket_max_side) fits 32 px squared"),
    ({"control": {"folders": ["CONTROLS"]}, "crop": "random"}, {}, {}, "use data.crop: center with data.control"),
    ({"control": {"folders": ["CONTROLS"]}}, {"mode": "class_images", "class_prompt": ["a"]}, {},
     "use prior.mode: base_prediction"),
    ({"control": {"folders": ["CONTROLS"]}}, {}, {"images": "VALIDATION"}, "hold out a fraction"),
    ({"control": {"folders": ["CONTROLS"]}}, {}, {}, "model.family sd takes no control images"),
])
def test_recipe_checks_refuse_what_would_part_a_target_from_its_control(tiny_base, tmp_path, monkeypatch, data, prior,
                                                                       validation, says):
    images, controls = _pairs(tmp_path)
    if "model.family sd" not in says:
        monkeypatch.setitem(specs(), "sd", replace(specs()["sd"], control_images=1))
    (images / "inside").mkdir()
    (tmp_path / "held").mkdir()
    named = {"CONTROLS": str(controls), "INSIDE": str(images / "inside"), "VALIDATION": str(tmp_path / "held")}
    control = {key: [named.get(f, f) for f in value] if key == "folders" else value
               for key, value in data.get("control", {}).items()}
    data = {**data, "control": control}
    validation = {key: named.get(value, value) for key, value in validation.items()}
    with pytest.raises(RecipeError) as raised:  # parse_recipe runs the checks, as `finetune validate` does
        parse_recipe(recipe_dict(tiny_base, images, tmp_path / "out", data=data, prior=prior, validation=validation))
    assert says in str(raised.value)


def test_relative_control_folders_are_read_beside_the_recipe(tiny_base, tmp_path, monkeypatch):
    import yaml

    from finetune.recipe.load import load_recipe

    monkeypatch.setitem(specs(), "sd", replace(specs()["sd"], control_images=1))
    project = tmp_path / "project"
    images, controls = _pairs(project)
    data = recipe_dict(tiny_base, images, "out", data={"control": {"folders": ["controls"]}})
    (project / "r.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.chdir(tmp_path)
    assert load_recipe(project / "r.yaml").data.control.folders == [str(controls)]
