"""A finished result is never lost, and `--resume` continues the run that was meant (issue 18, item 1):
the printed resume command carries the command line's overrides, a new run refuses an output_dir that holds
a finished artifact or checkpoints, and a resume with other settings says what differs."""
from __future__ import annotations

import json
import shlex
import signal
from pathlib import Path

import pytest
import yaml

from finetune.recipe.load import parse_recipe
from finetune.training.checkpoint import CheckpointError
from finetune.training.loop import train
from finetune.training.resume import OutputDirInUse, recipe_changes, resume_command
from tests.helpers import recipe_dict, start_training, wait_for_progress

ARTIFACT = "pytorch_lora_weights.safetensors"


def test_ctrl_c_prints_a_command_that_resumes_this_very_run(tiny_base, concept_dir, tmp_path):
    # the recipe file says 3 steps into recipe_out; the command line says 40 steps into a folder with a space
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(tiny_base, concept_dir, tmp_path / "recipe_out",
                                               train={"max_steps": 3})))
    out = tmp_path / "my runs" / "lora 1"
    overrides = ["train.max_steps=40", "checkpoint.every=0", f"output_dir={out}"]
    process = start_training(path, *overrides)
    assert wait_for_progress(process, " 1/40")
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=120)
    assert process.returncode == 130
    hint = rest.split("Continue with:\n", 1)[1].strip().splitlines()[0]
    assert hint == resume_command(str(path), overrides)
    words = shlex.split(hint)
    assert words[:3] == ["finetune", "train", str(path)] and words[3:6] == overrides

    # run exactly what was printed: it continues in the same folder to step 40, not anew in recipe_out
    process = start_training(*words[2:])
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]
    assert " 40/40" in err and " 0/40" not in err  # the bar starts at the checkpoint's step
    assert (out / ARTIFACT).is_file() and not (tmp_path / "recipe_out").exists()

    # the same command without --resume may not start anew over the finished run
    finished = (out / ARTIFACT).read_bytes()
    process = start_training(path, *overrides)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2
    assert "already holds a finished artifact" in err and "--overwrite" in err and "output_dir=PATH" in err
    # its checkpoint from the Ctrl-C is still there, but the run finished: continuing it is not offered
    assert "--resume latest" not in err
    assert "Loading pipeline components" not in err  # refused before any model loaded
    assert (out / ARTIFACT).read_bytes() == finished

    # --overwrite: asked for, so the earlier run's checkpoints go and a new run replaces the artifact
    process = start_training(path, *overrides[:1], "train.max_steps=2", *overrides[1:], "--overwrite")
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]
    assert not (out / "checkpoints").exists()
    assert (out / ARTIFACT).read_bytes() != finished


def _recipe(tiny_base, concept_dir, out: Path, **sections):
    return parse_recipe(recipe_dict(tiny_base, concept_dir, out, **sections))


def test_resume_latest_with_a_finished_run_and_no_checkpoint_is_refused(tiny_base, concept_dir, tmp_path):
    recipe = _recipe(tiny_base, concept_dir, tmp_path / "out", train={"max_steps": 2})
    finished = train(recipe).read_bytes()
    with pytest.raises(OutputDirInUse, match="nothing to resume.*finished artifact.*--overwrite"):
        train(recipe, resume="latest")
    assert (tmp_path / "out" / ARTIFACT).read_bytes() == finished
    with pytest.raises(OutputDirInUse, match="give one of them"):
        train(recipe, resume="latest", overwrite=True)


def test_another_run_in_the_same_output_dir_is_refused_even_without_an_artifact(tiny_base, concept_dir, tmp_path):
    # a run stopped after its first checkpoint: only checkpoints, no artifact yet
    recipe = _recipe(tiny_base, concept_dir, tmp_path / "out", train={"max_steps": 2}, checkpoint={"every": 1})
    train(recipe)
    (tmp_path / "out" / ARTIFACT).unlink()
    with pytest.raises(OutputDirInUse, match="checkpoints up to step-000001.*continue that run"):
        train(recipe)


def test_resume_says_what_changed_and_refuses_what_cannot_change(tiny_base, concept_dir, tmp_path, capsys):
    sections = dict(train={"max_steps": 3, "lr_scheduler": "linear"}, checkpoint={"every": 1})
    train(_recipe(tiny_base, concept_dir, tmp_path / "out", **sections))
    (tmp_path / "out" / ARTIFACT).unlink()

    other_seed = _recipe(tiny_base, concept_dir, tmp_path / "out", train={**sections["train"], "seed": 7},
                         checkpoint={"every": 1})
    with pytest.raises(CheckpointError, match=r"train\.seed: 0 in the checkpoint's run, 7 now"):
        train(other_seed, resume="latest")

    longer = _recipe(tiny_base, concept_dir, tmp_path / "out", train={**sections["train"], "max_steps": 5},
                     checkpoint={"every": 1})
    train(longer, resume="latest")
    out = capsys.readouterr().out
    assert "resume: train.max_steps: 3 in the checkpoint's run, 5 now: training goes on to step 5" in out
    assert "resumed from" in out and "at step 2" in out


def test_recipe_changes_sorts_notes_from_refusals():
    saved = {"train": {"max_steps": 10, "seed": 0}, "sample": {"every": 0}, "data": {"num_workers": 0}}
    now = {"train": {"max_steps": 20, "seed": 1}, "sample": {"every": 5}, "data": {"num_workers": 2}}
    notes, refusals = recipe_changes(saved, now)
    assert [n.split(":")[0] for n in notes] == ["data.num_workers", "sample.every", "train.max_steps"]
    assert refusals == ["train.seed: 0 in the checkpoint's run, 1 now"]


def test_a_checkpoint_from_before_the_speed_keys_resumes_with_them():
    """Issue 35 made train.compile a mode and added train.attention: a run saved before goes on (speed only)."""
    notes, refusals = recipe_changes({"train": {"compile": False}}, {"train": {"compile": "off", "attention": "auto"}})
    assert refusals == [] and sorted(n.split(":")[0] for n in notes) == ["train.attention", "train.compile"]


def test_resume_command_quotes_what_the_shell_would_split():
    command = resume_command("my recipes/lora.yaml", ["output_dir=out/run 1", "sample.prompts=[a sks, a red sks]"])
    assert shlex.split(command) == ["finetune", "train", "my recipes/lora.yaml", "output_dir=out/run 1",
                                    "sample.prompts=[a sks, a red sks]", "--resume", "latest"]


def test_validate_says_what_train_will_say_of_a_used_output_dir(tiny_base, concept_dir, tmp_path, capsys):
    import yaml

    from finetune.cli import main

    data = recipe_dict(tiny_base, concept_dir, tmp_path / "out", train={"max_steps": 1})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["validate", str(path)]) == 0 and "note:" not in capsys.readouterr().out
    train(parse_recipe(data))
    capsys.readouterr()
    assert main(["validate", str(path)]) == 0  # the recipe is fine; the run needs a flag
    assert "note: `finetune train` as it stands will stop: output_dir" in capsys.readouterr().out


def test_a_checkpoint_of_the_earlier_recipe_layout_resumes_unchanged(tiny_base, concept_dir, tmp_path):
    """Before the family options moved into the model section, a checkpoint's recipe held `flow:` at the top,
    `train.min_snr_gamma` / `noise_offset`, and every family's model keys: the same settings compare equal now,
    and a moved setting that changed is still named."""
    from finetune.recipe.load import parse_recipe, recipe_to_dict
    from finetune.training.resume import CheckpointError, check_resumable

    current = recipe_to_dict(parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "out",
                                                      model={"base": str(tiny_base), "min_snr_gamma": 5.0})))
    earlier = json.loads(json.dumps(current))
    earlier["train"]["min_snr_gamma"] = earlier["model"].pop("min_snr_gamma")
    earlier["train"]["noise_offset"] = earlier["model"].pop("noise_offset")
    earlier["flow"] = {"sigma_sampling": "auto", "shift": None}
    earlier["model"].update(text_encoder_3="auto", guidance=None)
    assert check_resumable({"recipe": earlier}, current, tmp_path) == []
    earlier["train"]["min_snr_gamma"] = 1.0
    with pytest.raises(CheckpointError, match="model.min_snr_gamma: 1.0 in the checkpoint's run, 5.0 now"):
        check_resumable({"recipe": earlier}, current, tmp_path)


def test_a_checkpoint_from_before_issue_36_resumes_and_offload_may_change(tiny_base, concept_dir, tmp_path):
    """A checkpoint written before masks, EMA, offload, optimizer_args, prompt files and validation existed lacks
    their keys: it resumes as it ran (unmasked). Block offload and the validation cadence may change on resume
    (memory and scores only); a mask weight that changed is still refused."""
    from finetune.recipe.load import parse_recipe, recipe_to_dict
    from finetune.training.resume import CheckpointError, check_resumable

    current = recipe_to_dict(parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "out")))
    earlier = json.loads(json.dumps(current))
    for section, key in [("data", "masks"), ("data", "unmasked_weight"), ("train", "ema"), ("train", "offload"),
                         ("train", "optimizer_args"), ("sample", "prompt_file")]:
        del earlier[section][key]
    del earlier["validation"]
    assert check_resumable({"recipe": earlier}, current, tmp_path) == []
    now = json.loads(json.dumps(current))
    now["train"]["offload"] = {"blocks": 2}
    now["validation"]["every"] = 5
    notes = check_resumable({"recipe": current}, now, tmp_path)
    assert sorted(n.split(":")[0] for n in notes) == ["train.offload.blocks", "validation.every"]
    now = json.loads(json.dumps(current))
    now["data"]["unmasked_weight"] = 0.5
    with pytest.raises(CheckpointError, match="data.unmasked_weight: 0.0 in the checkpoint's run, 0.5 now"):
        check_resumable({"recipe": earlier}, now, tmp_path)
