"""What the command line prints: the toolkit's messages in one style (plain information on stdout, `warning:`
on stderr), third-party warnings that do not apply filtered out (shown with --verbose), --quiet."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import yaml

from finetune import console
from finetune.networks import peft_layers
from tests.helpers import draw_concept, pipeline, recipe_dict


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finetune", *argv], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(autouse=True)
def normal_afterwards():
    yield
    console.configure(console.NORMAL)


@pytest.mark.parametrize("item", console.NOT_APPLICABLE, ids=lambda item: item.logger)
def test_warnings_that_do_not_apply_are_dropped_unless_verbose(item):
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger = logging.getLogger(item.logger)
    keep = Keep()
    logger.addHandler(keep)
    try:
        console.configure(console.NORMAL)
        logger.warning(f"`X` {item.text} something")
        logger.warning("an unrelated warning")
        assert seen == ["an unrelated warning"]
        console.configure(console.VERBOSE)
        logger.warning(f"`X` {item.text} something")
        assert seen[-1] == f"`X` {item.text} something"
    finally:
        logger.removeHandler(keep)


def test_a_unet_only_lora_loads_without_diffusers_text_encoder_warning(tiny_base, tmp_path):
    from peft import LoraConfig

    from finetune.export.lora import diffusers as diffusers_lora

    pipe = pipeline(tiny_base)
    config = LoraConfig(r=2, target_modules=["to_q"])
    peft_layers.inject(pipe.unet, config)
    path = diffusers_lora.save_lora(tmp_path / "unet_only.safetensors", {"unet": peft_layers.state_dict(pipe.unet)},
                                    {"unet": config.to_dict()}, {})
    argv = ["sample", "--base", str(tiny_base), "--adapter", str(path), "--prompt", "x", "--steps", "1", "--num", "1",
            "--out", str(tmp_path / "grid.png")]
    normal = _run(*argv)
    assert normal.returncode == 0, normal.stderr[-2000:]
    assert "No LoRA keys associated" not in normal.stderr and "requires torchvision" not in normal.stderr
    assert "warning" not in normal.stderr.lower()


def test_the_toolkits_messages_have_one_style_and_quiet_keeps_only_warnings(tiny_base, tmp_path):
    images = draw_concept(tmp_path / "small", size=16)  # smaller than the resolution: upscaled with a warning
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(tiny_base, images, tmp_path / "out", train={"max_steps": 2})))
    normal = _run("train", str(recipe))
    assert normal.returncode == 0, normal.stderr[-2000:]
    assert "\nlatent cache (memory): " in "\n" + normal.stdout  # information: a plain line on stdout
    assert "\nwarning: upscaling 4 image(s)" in "\n" + normal.stderr  # a warning says so, on stderr
    assert "INFO finetune" not in normal.stdout + normal.stderr and "training:" in normal.stderr

    quiet = _run("train", str(recipe), "--overwrite", "--quiet")
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert quiet.stdout == ""  # no plan, no list of files
    assert "warning: upscaling 4 image(s)" in quiet.stderr
    assert "training:" not in quiet.stderr and "Loading" not in quiet.stderr  # no progress bars

    both = _run("train", str(recipe), "-q", "-v")
    assert both.returncode == 2 and "--quiet and --verbose" in both.stderr


def test_without_a_terminal_progress_is_a_few_plain_lines(tiny_base, concept_dir, tmp_path):
    # `finetune train recipe.yaml > train.log 2>&1`: tqdm would add a carriage-return redraw at every step (and
    # the libraries' loading bars theirs); without a terminal a bar writes a line as it starts and as it ends,
    # and one every 30 s between (the run here takes less)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(
        tiny_base, concept_dir, tmp_path / "out", train={"max_steps": 20},
        sample={"every": 10, "prompts": ["a purple sks"], "steps": 2, "images_per_prompt": 1})))
    env = {key: value for key, value in os.environ.items() if key != "FINETUNE_PROGRESS_SECONDS"}
    with (tmp_path / "train.log").open("w") as log:
        assert subprocess.run([sys.executable, "-m", "finetune", "train", str(recipe)], stdout=log, stderr=log,
                              timeout=600, env={**env, "OMP_NUM_THREADS": "1"}).returncode == 0
    text = (tmp_path / "train.log").read_text()
    assert "\r" not in text
    bars = [line for line in text.splitlines() if "%|" in line]
    training = [line for line in bars if line.startswith("training:")]
    assert len(training) in (2, 3) and " 0/20" in training[0] and " 20/20" in training[-1], text
    assert len(bars) <= len(training) + 3, text  # the latent cache's start and end; no library bars


def test_the_tiny_model_script_answers_help_instead_of_writing_a_folder_named_so(tmp_path):
    result = subprocess.run([sys.executable, "-m", "finetune.models.tiny", "--help"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 0 and "usage: python -m finetune.models.tiny" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_without_a_terminal_a_bar_ends_in_one_100_percent_line(monkeypatch, capsys):
    # a line at every update (FINETUNE_PROGRESS_SECONDS=0): the last update and the close both draw 3/3
    monkeypatch.setenv("FINETUNE_PROGRESS_SECONDS", "0")
    monkeypatch.setattr(console, "_terminal", lambda: False)
    with console.progress_bar(total=3, desc="training", unit="step", bar_format="{desc}: {n_fmt}/{total_fmt}") as bar:
        for _ in range(3):
            bar.update(1)
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["training: 0/3", "training: 1/3", "training: 2/3", "training: 3/3"]
