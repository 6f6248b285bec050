"""The same `finetune train` under the command line, `accelerate launch` and `torchrun` (2 CPU processes)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from safetensors import safe_open

from tests.helpers import recipe_dict

BIN = Path(sys.executable).parent


def write_recipe(tiny_base, concept_dir, tmp_path, **sections) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(tiny_base, concept_dir, tmp_path / "out", **sections)))
    return path


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def steps_in(artifact: Path) -> int:
    with safe_open(str(artifact), framework="pt") as handle:
        return int(handle.metadata()["finetune.steps"])


def test_console_script_trains_and_resumes(tiny_base, concept_dir, tmp_path):
    recipe = write_recipe(tiny_base, concept_dir, tmp_path, checkpoint={"every": 2})
    result = run([str(BIN / "finetune"), "train", str(recipe), "train.max_steps=3"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert steps_in(tmp_path / "out" / "pytorch_lora_weights.safetensors") == 3
    result = run([sys.executable, "-m", "finetune", "train", str(recipe), "train.max_steps=4", "--resume", "latest"],
                 tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout + result.stderr and "at step 2" in result.stdout + result.stderr
    assert steps_in(tmp_path / "out" / "pytorch_lora_weights.safetensors") == 4


def test_bad_data_is_reported_before_the_model_loads(tiny_base, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "broken.png").write_bytes(b"not a png")
    (images / "broken.txt").write_text("a caption")
    recipe = write_recipe(tiny_base, images, tmp_path)
    result = run([sys.executable, "-m", "finetune", "train", str(recipe)], tmp_path)
    assert result.returncode == 2
    assert "broken.png" in result.stderr and "on_bad_image" in result.stderr
    assert "Loading pipeline components" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_accelerate_launch(tiny_base, concept_dir, tmp_path):
    recipe = write_recipe(tiny_base, concept_dir, tmp_path, train={"max_steps": 2})
    result = run([str(BIN / "accelerate"), "launch", "-m", "finetune", "train", str(recipe)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert steps_in(tmp_path / "out" / "pytorch_lora_weights.safetensors") == 2


def test_torchrun_two_cpu_processes_give_one_artifact(tiny_base, concept_dir, tmp_path):
    recipe = write_recipe(tiny_base, concept_dir, tmp_path, train={"max_steps": 4, "batch_size": 1},
                          checkpoint={"every": 2},
                          strategy={"kind": "lora", "rank": 4, "text_encoder": True})
    torchrun = shutil.which("torchrun", path=str(BIN)) or "torchrun"
    result = run([torchrun, "--nproc_per_node", "2", "-m", "finetune", "train", str(recipe)], tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert output.count("wrote:\n") == 1  # only the main process writes (and lists what it wrote)
    assert "effective batch 2 = 1 per process x 2 process(es) x 1 accumulation" in output
    assert "Traceback" not in output and "abort" not in output.lower()
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "history.jsonl", "pytorch_lora_weights.safetensors",
                                                     "report.html", "run.json"]
    # the main process alone writes the history: each step once
    assert [json.loads(line)["step"] for line in (out / "history.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]
    assert steps_in(out / "pytorch_lora_weights.safetensors") == 4  # optimizer steps, not steps x processes
