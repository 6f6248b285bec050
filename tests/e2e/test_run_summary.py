"""A run says what it will do before the first step (data per folder, repeats, epochs, steps, effective batch,
what trains, device, precision, where files go) and, at the end, lists every file it wrote with its absolute
path and what reads it, for every strategy."""
from __future__ import annotations

import re

import pytest
from safetensors.torch import load_file

from finetune.recipe.load import parse_recipe
from finetune.training.loop import train
from tests.helpers import STRATEGIES, draw_concept, recipe_dict


def test_the_plan_is_printed_before_training(tiny_base, tmp_path, capsys):
    # 6 images x 2 repeats = 12 samples = 6 micro-batches of 2 per epoch; 5 steps x 2 accumulation = 10 of them
    flat = draw_concept(tmp_path / "flat", count=6)
    recipe = parse_recipe(recipe_dict(tiny_base, flat, tmp_path / "out", data={"repeats": 2, "resolution": 32},
                                      train={"max_steps": 5, "batch_size": 2, "gradient_accumulation_steps": 2}))
    artifact = train(recipe)
    out = capsys.readouterr().out
    plan = out[:out.index("wrote:")]
    assert "data: 6 image(s), 12 samples per epoch with their repeats" in plan
    assert f"  {flat.resolve()}: 6 image(s) x 2 repeat(s)" in plan
    assert "steps: 5 (1.67 epoch(s)); effective batch 4 = 2 per process x 1 process(es) x 2 accumulation" in plan
    trained = sum(t.numel() for t in load_file(artifact).values())
    assert re.search(rf"trains: {trained:,} parameters \([\d.]+ KB\); on cpu, mixed precision no, frozen base in "
                     r"float32", plan)
    assert f"output: {(tmp_path / 'out').resolve()}" in plan


@pytest.mark.parametrize("strategy", STRATEGIES.values(), ids=STRATEGIES.keys())
def test_every_file_written_is_listed_with_what_reads_it(strategy, tiny_base, concept_dir, tmp_path, capsys):
    out = tmp_path / "out"
    train(parse_recipe(recipe_dict(tiny_base, concept_dir, out, strategy=strategy, train={"max_steps": 2},
                                   checkpoint={"every": 1})))
    listed = capsys.readouterr().out.split("wrote:\n", 1)[1].splitlines()
    paths = {line.split(": ", 1)[0].strip().rstrip("/"): line.split(": ", 1)[1] for line in listed}
    expected = {str(p) for p in out.resolve().iterdir()}  # every top-level entry
    expected |= {str(p) for folder in ("kohya", "a1111") for p in (out.resolve() / folder).glob("*")}
    expected -= {str(out.resolve() / folder) for folder in ("kohya", "a1111")}  # listed by their files
    assert set(paths) == expected
    for path, what in paths.items():
        if path.endswith(("checkpoints",)):
            assert "--resume latest" in what
        else:
            assert "read by " in what, (path, what)  # which program or loader reads it
    if strategy.get("formats") == ["diffusers", "kohya"]:
        assert any("kohya format" in w and "AUTOMATIC1111" in w for w in paths.values())


def test_textual_inversion_counts_its_new_vectors_not_the_whole_table(tiny_base, concept_dir, tmp_path, capsys):
    strategy = {"kind": "textual_inversion", "placeholder_token": "<sks>", "initializer_token": "x",
                "num_vectors": 2}
    train(parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "out", strategy=strategy,
                                   train={"max_steps": 1})))
    assert "trains: 64 parameters (0.2 KB)" in capsys.readouterr().out  # 2 vectors of the encoder's 32


def test_only_the_images_that_train_are_counted(tiny_base, tmp_path, capsys):
    from PIL import Image

    images = tmp_path / "imgs"
    images.mkdir()
    for i, size in enumerate([(32, 32), (32, 32), (64, 16)]):  # the wide one's bucket holds less than a batch
        Image.new("RGB", size, "red").save(images / f"{i}.png")
        (images / f"{i}.txt").write_text("a red block")
    train(parse_recipe(recipe_dict(tiny_base, images, tmp_path / "out", data={"bucketing": True},
                                   train={"max_steps": 1, "batch_size": 2})))
    assert "data: 2 image(s), 2 samples per epoch" in capsys.readouterr().out
