"""What a user sees when `finetune sample`, `finetune report` and a run meet a full or read-only disk or a base
model whose files are damaged: one `error:` line naming the file they gave (never a temporary name), what is wrong
and what to do, found before the model loads where that is possible (real tmpfs disks, real files cut short)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from finetune.cli import main
from finetune.file_errors import FileProblem
from finetune.recipe.load import parse_recipe
from finetune.training.failures import SaveFailed
from finetune.training.loop import train
from finetune.training.sampling import save_png
from tests.helpers import recipe_dict

SAMPLE = ["--prompt", "x", "--steps", "1", "--num", "1", "--resolution", "32"]


def _noise_image(side: int = 256) -> Image.Image:
    """An image whose PNG does not compress below the small disk's 64 KiB."""
    import numpy as np

    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8))


def test_a_png_on_a_full_disk_names_the_image_and_leaves_nothing(small_disk):
    with pytest.raises(FileProblem, match="no room left on the disk while writing the image") as raised:
        save_png(_noise_image(), small_disk / "grid.png")
    assert f"({small_disk / 'grid.png'})" in str(raised.value) and ".tmp" not in str(raised.value)
    assert list(small_disk.iterdir()) == []


def test_a_full_disk_at_a_sample_grid_is_the_error_shown(tiny_base, concept_dir, tmp_path, monkeypatch):
    """The grid's failure stops the run, naming the grid and how to go on; closing history.jsonl on the same full
    disk must not replace that message with its own (it did, naming no file, with checkpoint.every 0)."""
    from finetune.report import history

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(history.History, "close", lambda self: disk_full())
    monkeypatch.setattr(Image.Image, "save", disk_full)  # the grid is the run's only PIL image written
    out = tmp_path / "out"
    recipe = parse_recipe(recipe_dict(tiny_base, concept_dir, out, checkpoint={"every": 0},
                                      sample={"every": 1, "prompts": ["a sks"], "steps": 1}))
    with pytest.raises(SaveFailed, match="no room left on the disk while writing a sample grid at step 1") as raised:
        train(recipe)
    assert str(out / "samples" / "step-000001.png") in str(raised.value)
    assert "--resume latest" in str(raised.value) and ".tmp" not in str(raised.value)
    assert not list((out / "samples").glob("*"))


def test_sample_refuses_an_out_folder_it_cannot_write_before_loading(read_only_disk, tiny_base, capsys,
                                                                     monkeypatch):
    from finetune.models.stable_diffusion import StableDiffusion

    monkeypatch.setattr(StableDiffusion, "load", lambda *a, **k: pytest.fail("the base loaded first"))
    out = read_only_disk / "samples" / "g.png"
    assert main(["sample", "--base", str(tiny_base), *SAMPLE, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"error: --out: {read_only_disk} cannot be written" in err and "Traceback" not in err


def test_sample_on_a_base_whose_weights_file_is_cut_short_names_that_file(tiny_base, tmp_path, capsys):
    base = Path(shutil.copytree(tiny_base, tmp_path / "base"))
    weights = base / "unet" / "diffusion_pytorch_model.safetensors"
    with open(weights, "r+b") as file:
        file.truncate(weights.stat().st_size // 2)
    assert main(["sample", "--base", str(base), *SAMPLE, "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err
    assert f"the weights file {weights} is cut short or damaged" in err
    assert "download or copy the model again" in err and "Traceback" not in err
    assert not (tmp_path / "g.png").exists()


def test_sample_on_a_base_path_that_does_not_exist_says_so(tmp_path, capsys):
    missing = tmp_path / "no-such-base"
    assert main(["sample", "--base", str(missing), *SAMPLE, "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err
    assert f"{missing} does not exist" in err
    assert "hub" not in err.split("does not exist")[0]  # not looked up on the hub as if it were an id
