"""Every entry of the bad-input catalogue (tests/bad_inputs.py): exit code 2, a message naming the problem and
the fix (every setting and command it suggests valid as printed: tests/suggestions.py), no model loaded unless the
check needs one, nothing half-written in output_dir; and docs/troubleshooting.md's table is the catalogue's."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from finetune.cli import main
from finetune.models.stable_diffusion import StableDiffusion
from tests import suggestions
from tests.bad_inputs import CATALOGUE, TABLE_END, TABLE_START, Workspace, troubleshooting_table, with_table

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ("pytorch_lora_weights.safetensors", "learned_embeds.safetensors", "pipeline", "kohya")


def test_the_catalogue_holds_at_least_30_distinct_bad_inputs():
    assert len({case.name for case in CATALOGUE}) == len(CATALOGUE) >= 30


@pytest.mark.parametrize("case", CATALOGUE, ids=lambda case: case.name)
def test_bad_input_exits_2_with_the_problem_and_the_fix(case, tiny_base, tmp_path, monkeypatch, capsys):
    ws = Workspace(tmp_path, tiny_base, monkeypatch)
    argv = case.make(ws)
    capsys.readouterr()  # what setting the stage printed is not the answer
    artifacts_before = {name for name in ARTIFACTS if (ws.out / name).exists()}
    loads = []
    real_load = StableDiffusion.load
    monkeypatch.setattr(StableDiffusion, "load", lambda self, *a, **k: loads.append(a) or real_load(self, *a, **k))

    assert main(argv) == 2
    printed = capsys.readouterr().err
    assert "\nerror: " in "\n" + printed and "Traceback" not in printed
    message = printed[printed.rindex("error: "):]  # after any progress bars of the model loading
    for fragment in case.says:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert suggestions.problems(message) == [], "a suggested setting or command does not work as printed"
    assert bool(loads) == case.loads_model, "a model was loaded" if loads else "no model was loaded"
    assert_nothing_half_written(ws.out, artifacts_before)
    if case.then is not None:
        case.then(ws)


def assert_nothing_half_written(out: Path, artifacts_before: set[str]) -> None:
    """No temporaries, every file whole, and no final artifact from the run that failed."""
    if not out.is_dir():
        return
    for path in out.rglob("*"):
        name = path.name
        assert not re.match(r"^\..*\.(tmp|old)(-\d+)?$|^\.tmp-step-", name), f"left half-written: {path}"
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    handle.get_tensor(key)
        elif path.suffix == ".json":
            json.loads(path.read_text())
    assert {name for name in ARTIFACTS if (out / name).exists()} == artifacts_before


# what `finetune train` refuses only once the run starts: the device it gets, what output_dir holds, checkpoints,
# and what happens mid-run; and the other commands' inputs. Everything else `validate` must refuse alike
RUN_TIME = {"fp16-on-cpu", "output-dir-holds-a-run", "resume-a-finished-run", "resume-another-recipe",
            "resume-not-a-checkpoint", "loss-not-finite", "disk-full-at-checkpoint", "disk-full-at-final-save",
            "checkpoint-cut-short", "checkpoint-without-state", "adapter-file-cut-short",
            "sample-control-on-a-base-that-is-no-edit-model"}
VALIDATE_CASES = [case for case in CATALOGUE if not case.loads_model and case.name not in RUN_TIME]


@pytest.mark.parametrize("case", VALIDATE_CASES, ids=lambda case: case.name)
def test_validate_refuses_what_train_refuses(case, tiny_base, tmp_path, monkeypatch, capsys):
    ws = Workspace(tmp_path, tiny_base, monkeypatch)
    argv = case.make(ws)
    assert argv[0] == "train", case.name
    capsys.readouterr()
    # --decode: a truncated image has an intact header; only decoding finds it, as training does
    assert main(["validate", *argv[1:], "--decode"]) == 2
    message = capsys.readouterr().err
    for fragment in case.says:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert suggestions.problems(message) == [], "a suggested setting or command does not work as printed"


def test_validate_prints_the_data_summary_reading_headers_only(tiny_base, tmp_path, monkeypatch, capsys):
    from finetune.data import images

    ws = Workspace(tmp_path, tiny_base, monkeypatch)
    decoded = []
    real = images.Image.Image.load
    monkeypatch.setattr(images.Image.Image, "load", lambda self: decoded.append(1) or real(self))
    assert main(["validate", ws.recipe(data={"repeats": 3})]) == 0
    out = capsys.readouterr().out
    assert "data: 4 image(s), 12 samples per epoch with their repeats" in out
    assert f"  {ws.images.resolve()}: 4 image(s) x 3 repeat(s)" in out
    assert "steps: 4 (0.333 epoch(s)); effective batch 1" in out and "checked by their headers" in out
    assert decoded == []  # no pixel decoded
    assert main(["validate", ws.recipe(), "--decode"]) == 0 and decoded


def test_the_docs_troubleshooting_page_is_the_catalogue():
    page = (ROOT / "docs" / "troubleshooting.md").read_text(encoding="utf-8")
    start, end = TABLE_START + "\n", "\n" + TABLE_END
    assert start in page and end in page
    section = page[page.index(start) + len(start):page.index(end)]
    assert section == troubleshooting_table(), \
        "stale: regenerate it with python -m tests.bad_inputs docs/troubleshooting.md"


def test_the_troubleshooting_table_is_rewritten_between_its_markers():
    """What `python -m tests.bad_inputs PAGE` writes: the text around the markers kept, a stale table replaced."""
    stale = f"intro\n{TABLE_START}\n| old | row |\n{TABLE_END}\nadvice\n"
    assert with_table(stale) == f"intro\n{TABLE_START}\n{troubleshooting_table()}\n{TABLE_END}\nadvice\n"
    with pytest.raises(ValueError):
        with_table("a page without the markers")


def test_every_image_mode_trains_upright_and_in_colour(tiny_base, tmp_path):
    """Grayscale, RGBA, palette, 16-bit and EXIF-rotated files are accepted and decoded as upright RGB; a run
    trains on all of them together (each conversion is checked pixel by pixel in tests/unit/test_data.py)."""
    from finetune.data.sources import list_examples

    folder = tmp_path / "modes"
    folder.mkdir()
    red_left = np.zeros((32, 32, 3), np.uint8)
    red_left[:, :16] = (255, 0, 0)
    Image.fromarray(red_left).convert("L").save(folder / "gray.png")
    Image.fromarray(red_left).convert("RGBA").save(folder / "rgba.png")
    Image.fromarray(red_left).convert("P").save(folder / "palette.png")
    Image.fromarray((np.asarray(Image.fromarray(red_left).convert("L"), np.uint16) * 257)).save(folder / "deep.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: the viewer turns it 90 degrees clockwise
    Image.fromarray(np.rot90(red_left, k=1).copy()).save(folder / "rotated.jpg", exif=exif, quality=95)
    for image in folder.iterdir():
        image.with_suffix(".txt").write_text("a half red square")
    examples = list_examples(str(folder), None, prompt=None, caption_extension=".txt", split="train",
                             image_column="image", caption_column="text", on_bad_image="error")
    for example in examples:
        pixels = np.asarray(example.load(), np.float32)
        assert pixels.shape == (32, 32, 3), example.name
        # upright: the left half is the marked one, in every mode
        assert pixels[:, :16].mean() > pixels[:, 16:].mean() + 20, example.name
    assert main(["train", str(_recipe(tiny_base, folder, tmp_path))]) == 0
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()


def _recipe(base: Path, images: Path, tmp_path: Path) -> Path:
    import yaml

    from tests.helpers import recipe_dict

    path = tmp_path / "modes.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(base, images, tmp_path / "out", train={"max_steps": 2})))
    return path


def test_small_images_are_upscaled_with_a_warning_by_default(tiny_base, tmp_path, caplog):
    from tests.helpers import draw_concept

    images = draw_concept(tmp_path / "images", size=16)
    with caplog.at_level("WARNING"):
        assert main(["train", str(_recipe(tiny_base, images, tmp_path))]) == 0
    assert "upscaling 4 image(s) smaller than the size they train at" in caplog.text


def test_small_images_can_be_left_out(tiny_base, tmp_path, caplog):
    import yaml

    from tests.helpers import draw_concept, recipe_dict

    images = draw_concept(tmp_path / "images")
    Image.new("RGB", (16, 16), "red").save(images / "small.png")
    (images / "small.txt").write_text("a red square")
    recipe = tmp_path / "skip.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(tiny_base, images, tmp_path / "out", train={"max_steps": 1},
                                                 data={"on_small_image": "skip"})))
    with caplog.at_level("WARNING"):
        assert main(["train", str(recipe)]) == 0
    assert "leaving out 1 image(s)" in caplog.text and "small.png" in caplog.text
    with safe_open(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"), framework="pt") as handle:
        assert handle.metadata()["finetune.num_train_images"] == "4"
