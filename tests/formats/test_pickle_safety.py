"""No way into finetune runs code from a pickle: a malicious .pt/.ckpt (one that would write a file when
unpickled) is refused by every command and function that reads pickles, and the file is never written."""
from __future__ import annotations

import shutil

import pytest
import torch

from finetune import load_adapter
from finetune.cli import main
from finetune.io.pickle_files import UnsafePickleError
from finetune.recipe.load import parse_recipe
from finetune.training import loop
from finetune.training.checkpoint import CheckpointError
from tests.helpers import pipeline, recipe_dict


class WritesAFile:
    """Unpickling this calls open(target, "w"): the file's existence afterwards proves code ran."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.fixture
def evil(tmp_path):
    victim = tmp_path / "pwned.txt"

    def make(name: str, shape: str = "embedding"):
        payload = WritesAFile(str(victim))
        data = {"embedding": {"string_to_param": {"*": payload}, "name": "x"},
                "hypernetwork": {768: ({}, {}), "payload": payload},
                "checkpoint": {"state_dict": {"model.diffusion_model.x": payload}}}[shape]
        path = tmp_path / name
        torch.save(data, path)
        return path

    yield make
    assert not victim.exists(), "a pickle ran code"


@pytest.mark.parametrize("shape", ["embedding", "hypernetwork"])
def test_load_adapter(evil, tiny_base, shape):
    with pytest.raises(UnsafePickleError, match="could run code"):
        load_adapter(pipeline(tiny_base), evil("adapter.pt", shape))


@pytest.mark.parametrize("name, shape, argv", [
    ("model.ckpt", "checkpoint", ["inspect", "{file}"]),
    ("sks.pt", "embedding", ["inspect", "{file}"]),
    ("sks.pt", "embedding", ["convert", "{file}", "{out}", "--to", "diffusers"]),
    ("model.ckpt", "checkpoint", ["sample", "--base", "{file}", "--prompt", "x", "--out", "{out}.png"]),
])
def test_commands_exit_2(evil, tmp_path, capsys, name, shape, argv):
    path = evil(name, shape)
    args = [a.format(file=path, out=tmp_path / "out.safetensors") for a in argv]
    assert main(args) == 2
    assert "could run code" in capsys.readouterr().err


def test_sample_with_a_pickled_adapter(evil, tiny_base, tmp_path, capsys):
    path = evil("sks.pt")
    assert main(["sample", "--base", str(tiny_base), "--adapter", str(path), "--prompt", "x",
                 "--out", str(tmp_path / "grid.png"), "--device", "cpu"]) == 2
    assert "could run code" in capsys.readouterr().err and not (tmp_path / "grid.png").exists()


def test_train_on_a_pickled_base(evil, concept_dir, tmp_path, capsys):
    recipe = recipe_dict(evil("base.ckpt", "checkpoint"), concept_dir, tmp_path / "out")
    import yaml

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", str(tmp_path / "r.yaml")]) == 2
    assert "could run code" in capsys.readouterr().err


def test_resume_from_a_checkpoint_with_a_pickled_training_state(evil, tiny_base, concept_dir, tmp_path):
    out = tmp_path / "out"
    recipe = recipe_dict(tiny_base, concept_dir, out, train={"max_steps": 2}, checkpoint={"every": 1, "keep": 5})
    loop.train(parse_recipe(recipe))
    step = sorted((out / "checkpoints").iterdir())[-1]
    shutil.move(evil("training_state.pt", "checkpoint"), step / "training_state.pt")
    recipe["train"]["max_steps"] = 3
    with pytest.raises(CheckpointError, match="could run code"):
        loop.train(parse_recipe(recipe), resume=str(step))
