"""Whole-transformer DreamBooth through FSDP on the one loop, launched as users launch it: `accelerate launch` with
the shipped config (recipes/accelerate/fsdp_flux.yaml) and recipe (recipes/flux_dreambooth_fsdp.yaml), on two CPU
processes over gloo and a tiny Flux.

accelerate 1.15 gives DDP when a CPU run asks for FSDP, and DDP computes the same numbers, so a run that only
compared results would pass without sharding anything. tests/fsdp_child.py keeps accelerate's FSDP on the CPU, and
these tests check what the run says of itself against its parameters: the sharded run must report half of the
transformer on each process, and must train as the DDP run does (the same batches, split differently)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.distributed import is_sharded, local_fraction
from finetune.training.engine import refuse_unsharded_work, sharding_report

ROOT = Path(__file__).parents[2]
CONFIG = ROOT / "recipes" / "accelerate" / "fsdp_flux.yaml"
RECIPE = ROOT / "recipes" / "flux_dreambooth_fsdp.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(base: Path, images: Path, out: Path, *, fsdp: bool, extra: tuple[str, ...] = ()) -> str:
    """Two processes under the shipped accelerate config; returns what they printed."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG),
               "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(_free_port()),
               str(ROOT / "tests" / "fsdp_child.py"), "train", str(RECIPE), f"model.base={base}",
               f"data.images={images}", "data.resolution=32", "data.repeats=1", "train.max_steps=3",
               "checkpoint.every=2", "prior.mode=none", "train.mixed_precision=no",
               "train.gradient_checkpointing=false", "train.learning_rate=1e-3", "strategy.save_dtype=fp32",
               "log.to=[]", f"output_dir={out}", *extra]
    env = {**os.environ, "FSDP_ON_CPU": "1" if fsdp else "0", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def transformer_weights(out: Path) -> dict[str, torch.Tensor]:
    folder = out / "pipeline" / "transformer"
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from finetune.models.tiny import save_tiny_pipeline
    from tests.helpers import draw_concept

    root = tmp_path_factory.mktemp("fsdp")
    base = save_tiny_pipeline(root / "flux", family="flux")
    images = draw_concept(root / "images")
    logs = {"fsdp": launch(base, images, root / "fsdp", fsdp=True),
            "ddp": launch(base, images, root / "ddp", fsdp=False)}
    # the FSDP run again from its step-2 checkpoint (gathered whole from both processes) to step 3
    shutil.copytree(root / "fsdp" / "checkpoints", root / "resumed" / "checkpoints")
    logs["resumed"] = launch(base, images, root / "resumed", fsdp=True, extra=("--resume", "latest"))
    return root, base, logs


def test_the_run_says_it_shards_and_its_parameters_are_sharded(runs):
    _, _, logs = runs
    assert "engine: FSDP (parameters sharded), 2 process(es)" in logs["fsdp"]
    # measured from the prepared transformer's DTensors, not read from the config
    assert "sharding: this process holds 50% of the transformer's parameters" in logs["fsdp"]
    assert "DDP over CPU processes" in logs["ddp"] and "nothing is sharded" in logs["ddp"]
    assert "sharding:" not in logs["ddp"]


def test_fsdp_trains_as_ddp_and_writes_the_whole_transformer(runs):
    root, base, _ = runs
    fsdp, ddp = transformer_weights(root / "fsdp"), transformer_weights(root / "ddp")
    before = {k: v for f in sorted((base / "transformer").glob("*.safetensors")) for k, v in load_file(f).items()}
    assert set(fsdp) == set(before) == set(ddp)
    for key in fsdp:
        assert fsdp[key].shape == before[key].shape, key  # whole, not one process's slice
        torch.testing.assert_close(fsdp[key], ddp[key], atol=2e-5, rtol=0)  # reduction order differs
    moved = max((fsdp[k] - before[k]).abs().max().item() for k in fsdp)
    assert moved > 1e-4, "the transformer did not train"


def test_an_fsdp_checkpoint_resumes_to_the_same_weights(runs):
    root, _, logs = runs
    assert "resumed from" in logs["resumed"] and "step 2" in logs["resumed"]
    resumed, straight = transformer_weights(root / "resumed"), transformer_weights(root / "fsdp")
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], atol=1e-6, rtol=0)


def test_fsdp_refuses_what_it_does_not_shard_before_any_work():
    assert refuse_unsharded_work("MULTI_GPU", "lora", False, False, 100) == []
    lora = refuse_unsharded_work("FSDP", "lora", False, False, 0)
    assert len(lora) == 1 and lora[0].startswith("strategy.kind: lora") and "DDP" in lora[0]
    both = refuse_unsharded_work("FSDP", "dreambooth", True, True, 50)
    assert [p.split(":")[0] for p in both] == ["strategy.text_encoder", "sample.every"]


def test_a_claim_of_fsdp_with_whole_parameters_is_called_out():
    model = torch.nn.Linear(4, 4)
    assert not is_sharded(model) and local_fraction(model) == 1.0
    line, warning = sharding_report("FSDP", 2, {"transformer": local_fraction(model)})
    assert "100% of the transformer's parameters" in line and "nothing is sharded" in warning
    assert sharding_report("FSDP", 2, {"transformer": 0.5})[1] is None
    assert sharding_report("MULTI_GPU", 2, {"transformer": 1.0}) == (None, None)
