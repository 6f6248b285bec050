"""`train.compile` (finetune/training/compile.py): which mode a run gets, what each refuses, a whole run compiled
by blocks with inductor, batch sizes that do not recompile without end, and inductor's cache folder. Every family
and strategy compiled by blocks: tests/contracts/test_compile_contract.py."""
from __future__ import annotations

import logging
import os

import pytest
import torch

from finetune.data.dataset import uncropped_conditions
from finetune.models import family_for
from finetune.recipe.load import RecipeError, parse_recipe
from finetune.report.history import read_history
from finetune.training import compile as compiling
from finetune.training.loop import train
from tests.helpers import recipe_dict


@pytest.mark.parametrize("mode, device, expected", [
    ("auto", "cuda", "blocks"), ("auto", "cpu", "off"), ("auto", "mps", "off"), ("off", "cuda", "off"),
    ("blocks", "cpu", "blocks"), ("full", "cpu", "full"), ("max", "cuda", "max")])
def test_auto_compiles_by_blocks_on_cuda_only(mode, device, expected):
    assert compiling.resolve(mode, device) == expected


def test_auto_does_not_compile_a_sharded_run_but_blocks_by_name_does():
    assert compiling.resolve("auto", "cuda", sharded=True) == "off"
    assert compiling.resolve("blocks", "cuda", sharded=True) == "blocks"


def test_max_is_refused_without_cuda_or_with_several_batch_shapes():
    assert compiling.problems("max", "cuda", 1) == []
    on_cpu = compiling.problems("max", "cpu", 1)
    assert len(on_cpu) == 1 and "CUDA graphs" in on_cpu[0] and "train.compile: blocks" in on_cpu[0]
    buckets = compiling.problems("max", "cuda", 3)
    assert len(buckets) == 1 and "3 bucket sizes" in buckets[0]
    assert compiling.problems("blocks", "cpu", 3) == [] and compiling.problems("full", "cuda", 5) == []


def test_a_recipe_asking_max_on_a_cpu_is_refused_before_the_model_loads(tiny_base, concept_dir, tmp_path,
                                                                         monkeypatch):
    monkeypatch.setattr("finetune.training.run.family_for", lambda *a, **k: pytest.fail("the base was loaded"))
    with pytest.raises(RecipeError, match="CUDA graphs"):
        train(parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "out", train={"compile": "max"})))


def test_an_older_recipes_true_reads_as_full_and_a_wrong_mode_is_named(tiny_base, concept_dir, tmp_path):
    recipe = parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "out", train={"compile": True}))
    assert recipe.train.compile == "full"
    assert parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "o", train={"compile": False})
                        ).train.compile == "off"
    with pytest.raises(RecipeError, match="did you mean 'blocks'"):
        parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "o", train={"compile": "block"}))


def test_blocks_finds_the_unets_attention_and_resnet_blocks(tiny_base):
    unet = family_for("sd").load(str(tiny_base)).denoiser
    names = compiling.block_classes(unet, family_for("sd").spec.compile_blocks)
    assert set(names) == {"BasicTransformerBlock", "ResnetBlock2D"}
    with pytest.raises(ValueError, match="use train.compile: full"):
        compiling.compile_denoiser(unet, "blocks", ("NoSuchBlock",), backend="eager")


def test_a_run_compiled_by_blocks_trains_as_the_eager_one(tiny_base, concept_dir, tmp_path, caplog):
    """Inductor compiles each block (with the LoRA layers inside) during the first step; the run says so, saves
    the names an eager run saves, its losses are the eager run's to rounding, and the first step's compile is
    printed."""
    from safetensors.torch import load_file

    caplog.set_level(logging.INFO)
    losses, artifacts = {}, {}
    for mode in ("off", "blocks"):
        recipe = parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / mode,
                                          train={"max_steps": 3, "compile": mode}))
        artifacts[mode] = load_file(train(recipe))
        losses[mode] = [record["loss"] for record in read_history(tmp_path / mode)]
    torch._dynamo.reset()
    assert "compile: blocks" in caplog.text and "BasicTransformerBlock, ResnetBlock2D" in caplog.text
    assert "compile (step 1):" in caplog.text and "no graph break" in caplog.text
    assert artifacts["off"].keys() == artifacts["blocks"].keys()
    # step 1 to rounding; later steps start from weights one rounded update apart
    assert losses["blocks"] == pytest.approx(losses["off"], rel=1e-3)
    # (not the weights element by element: Adam's first updates are lr x the sign of each gradient, and a gradient
    # near zero may round to either sign)


def test_new_batch_sizes_stop_recompiling_once_sizes_are_dynamic(tiny_base):
    """Buckets: the second new size makes dynamo mark the sizes dynamic, so the graphs stop growing."""
    from finetune.training.compile import CompileFigures

    family = family_for("sd")
    parts = family.load(str(tiny_base))
    torch._dynamo.reset()
    compiling.compile_denoiser(parts.denoiser, "blocks", family.spec.compile_blocks, backend="aot_eager")
    conditioning = family.encode_prompts(parts, ["a shape"])
    start, graphs = CompileFigures.now(), []
    try:
        for side in (4, 6, 8, 10, 12):
            with torch.no_grad():
                family.predict(parts, torch.randn(1, 4, side, side), torch.tensor([10]), conditioning,
                               uncropped_conditions(1, side * 8, side * 8))
            graphs.append(CompileFigures.now().since(start).graphs)
    finally:
        torch._dynamo.reset()
    assert graphs[0] > 0 and graphs[2] == graphs[3] == graphs[4], graphs


def test_inductors_cache_lives_under_the_finetune_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path))
    compiling.use_finetune_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    compiling.use_finetune_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")  # the user's choice stays
