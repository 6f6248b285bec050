"""Flux.1 Kontext (finetune/models/flux_kontext.py) on its tiny build (the tiny Flux.1-dev's parts in a
FluxKontextPipeline): samples drawn with a control image are FluxKontextPipeline's own, training's sample grids show
the control image, kohya's layout round-trips, a single checkpoint is told as Flux.1's, and a family that is no edit
model refuses control images before loading. What training feeds the transformer with a control image, and what
every edit family shares, is tests/contracts/test_edit_contract.py's; LoRA, DreamBooth and the stock loader:
test_family_contract.py and test_strategy_contract.py."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import finetune
from finetune.cli import main
from finetune.models import family_for
from finetune.models.base import unwrapped
from finetune.models.tiny import save_tiny_pipeline
from finetune.recipe.load import parse_recipe
from tests.helpers import (declares_data_control, draw_concept, flux_prediction, noise_image, recipe_dict,
                           saved_pipeline, train_keeping_parts, train_shipped_recipe)

PROMPT = "make the triangle blue"


@pytest.fixture(scope="module")
def kontext_base(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-kontext", family="flux_kontext")


@pytest.fixture(scope="module")
def control(tmp_path_factory):
    path = tmp_path_factory.mktemp("control") / "before.png"
    noise_image(32, 32, seed=5).save(path)
    return path


def _cells(path, count: int) -> list[np.ndarray]:
    grid = np.asarray(Image.open(path).convert("RGB"))
    assert grid.shape == (32, 32 * count, 3)
    return [grid[:, 32 * i:32 * (i + 1)] for i in range(count)]


def test_a_sample_with_a_control_image_is_the_pipelines_own_and_differs_without_it(kontext_base, control, tmp_path):
    """`finetune sample --control`: the grid shows the control image, then the image FluxKontextPipeline draws
    from the same seed with it (at the size asked, the control image at its own); without --control another
    image."""
    from diffusers import FluxKontextPipeline

    common = ["sample", "--base", str(kontext_base), "--prompt", PROMPT, "--steps", "2", "--num", "1",
              "--resolution", "32", "--seed", "3", "--guidance", "3.5"]
    assert main([*common, "--control", str(control), "--out", str(tmp_path / "with.png")]) == 0
    assert main([*common, "--out", str(tmp_path / "without.png")]) == 0
    shown, drawn = _cells(tmp_path / "with.png", 2)
    (plain,) = _cells(tmp_path / "without.png", 1)
    assert np.array_equal(shown, np.asarray(Image.open(control).convert("RGB")))
    pipe = FluxKontextPipeline.from_pretrained(str(kontext_base))
    pipe.set_progress_bar_config(disable=True)
    direct = pipe(prompt=PROMPT, image=Image.open(control).convert("RGB"), height=32, width=32, max_area=32 * 32,
                  _auto_resize=False, num_inference_steps=2, guidance_scale=3.5,
                  max_sequence_length=pipe.tokenizer_2.model_max_length,  # 32: the tiny T5's, as training pads
                  generator=torch.Generator().manual_seed(3)).images[0]
    assert np.array_equal(drawn, np.asarray(direct))
    assert not np.array_equal(drawn, plain)  # a random tiny model: the control image moves a few levels


def test_a_family_that_is_no_edit_model_refuses_control_before_loading(tiny_base, control, tmp_path, capsys,
                                                                       monkeypatch):
    from finetune.models.family import Family

    def no_loading(*args, **kwargs):
        raise AssertionError("the base was loaded")

    monkeypatch.setattr(Family, "load", no_loading)
    assert main(["sample", "--base", str(tiny_base), "--prompt", "x", "--control", str(control),
                 "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "--control / control_image: Stable Diffusion 1.x/2.x (sd) is no edit model" in err
    assert main(["sample", "--base", str(tiny_base), "--prompt", "x", "--control", str(tmp_path / "none.png"),
                 "--out", str(tmp_path / "x.png")]) == 2
    assert f"--control: control_image: {tmp_path / 'none.png'} does not exist" in capsys.readouterr().err


def test_training_grids_show_the_control_image_before_the_result(kontext_base, control, tmp_path):
    """A sample prompt with a control image and one without: the grid's first column holds the control image
    (white beside the plain prompt), the report labels that column."""
    recipe = parse_recipe(recipe_dict(
        kontext_base, draw_concept(tmp_path / "images", count=2), tmp_path / "out",
        train={"max_steps": 2, "batch_size": 1},
        sample={"every": 2, "steps": 2, "guidance_scale": 3.5,
                "prompts": [{"prompt": PROMPT, "control_image": str(control)}, "a purple sks"]}))
    train_keeping_parts(recipe)
    grid = np.asarray(Image.open(tmp_path / "out" / "samples" / "step-000002.png").convert("RGB"))
    assert grid.shape == (64, 64, 3)
    assert np.array_equal(grid[:32, :32], np.asarray(Image.open(control).convert("RGB")))
    assert (grid[32:, :32] == 255).all() and not (grid[32:, 32:] == 255).all()
    report = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert ">control 1<" in report and "control: before.png" in report


def test_kohyas_layout_round_trips_on_kontext(kontext_base, tmp_path):
    """strategy.formats [kohya]: Flux.1's BFL names (what ComfyUI reads for Kontext), proj_mlp fused into the
    single blocks' linear1 beside q/k/v; load_adapter of that file onto FluxKontextPipeline computes what was
    trained."""
    from safetensors import safe_open

    recipe = parse_recipe(recipe_dict(kontext_base, draw_concept(tmp_path / "images"), tmp_path / "out",
                                      strategy={"kind": "lora", "rank": 2, "alpha": 4,
                                                "formats": ["diffusers", "kohya"]},
                                      train={"max_steps": 3, "learning_rate": 1e-2, "batch_size": 2}))
    artifact, parts = train_keeping_parts(recipe)
    (kohya,) = (tmp_path / "out" / "kohya").glob("*.safetensors")
    with safe_open(str(kohya), "pt") as handle:
        keys = set(handle.keys())
        header = handle.metadata()
    assert "lora_unet_single_blocks_0_linear1.lora_down.weight" in keys
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert json.loads(header["finetune.recipe"])["model"]["family"] in ("auto", "flux_kontext")
    trained = flux_prediction(unwrapped(parts.transformer))
    pipe = saved_pipeline(kontext_base)
    assert type(pipe).__name__ == "FluxKontextPipeline"
    assert (trained - flux_prediction(pipe.transformer)).abs().max() > 1e-4
    finetune.load_adapter(pipe, str(kohya))
    torch.testing.assert_close(flux_prediction(pipe.transformer), trained, atol=1e-5, rtol=0)


def test_a_single_kontext_checkpoint_is_told_as_flux1(tmp_path):
    """Kontext's checkpoint holds Flux.1-dev's keys (the docstring's reason): auto tells it as flux, and
    model.family: flux_kontext says otherwise."""
    from safetensors.torch import save_file

    from finetune.models.detect import family_of

    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(1)}, str(tmp_path / "kontext.safetensors"))
    assert family_of(str(tmp_path / "kontext.safetensors")) == "flux"
    assert family_for("flux_kontext").spec.single_file_keys == ()


@pytest.mark.skipif(not declares_data_control(), reason="data.control (issue 38's paired data) is not declared yet")
def test_the_shipped_recipe_validates_and_trains_on_its_edit_pairs(kontext_base, tmp_path):
    """recipes/flux_kontext_lora.yaml as shipped (data_examples/star_edit: targets and control/), on the tiny
    Kontext: validate finds the pairs, training writes the LoRA."""
    out = train_shipped_recipe("flux_kontext_lora", kontext_base, tmp_path)
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_training_gives_each_target_its_own_control_image_tokens(kontext_base, tmp_path):
    """Through the loop (data.control folders, cached latents): every transformer call holds the target's 16
    tokens, then its own control image's 16, packed from the control image's VAE mode, with ids (1, row, col)."""
    from finetune.models.flux import pack
    from tests.helpers import control_latents_of, recording

    images, controls = tmp_path / "images", tmp_path / "control"
    images.mkdir()
    controls.mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), ("red", "blue")[i]).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"edit number {i}")
        noise_image(32, 32, seed=10 + i).save(controls / f"{i}.png")
    calls = []
    recipe = parse_recipe(recipe_dict(kontext_base, images, tmp_path / "out", data={"control": {"folders": [
        str(controls)]}}, train={"max_steps": 4, "batch_size": 1}))
    _, parts = train_keeping_parts(recipe, before_steps=lambda parts: recording(
        parts.transformer, calls, keep=("hidden_states", "img_ids", "encoder_hidden_states")))
    family = family_for("flux_kontext")
    with torch.no_grad():
        texts = [family.encode_prompts(parts, [f"edit number {i}"])[0] for i in range(2)]
        expected = [pack(control_latents_of(family, parts, [Image.open(controls / f"{i}.png")])[0]) for i in range(2)]
    assert len(calls) == 4
    for call in calls:
        (i,) = [i for i in range(2) if torch.allclose(call["encoder_hidden_states"], texts[i], atol=1e-5)]
        assert call["hidden_states"].shape == (1, 32, 16)
        torch.testing.assert_close(call["hidden_states"][:, 16:], expected[i], atol=1e-5, rtol=0)
        assert call["img_ids"][16:, 0].eq(1).all() and call["img_ids"][:16, 0].eq(0).all()
