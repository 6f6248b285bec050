"""Shared fixtures (a tiny Stable Diffusion pipeline built from configs, a tiny image folder, a LoRA file, small
disks) and the test environment. What test modules share besides fixtures is in tests/helpers.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest


def _torchvision_for_cpu_torch() -> None:
    """Make the test-only torchvision importable: the Qwen3-VL processor Qwen-Image 2.1 loads with needs a video
    processor, which needs torchvision, and the torchvision wheel the registry offers for torch 2.13 is linked to
    CUDA torch: on CPU torch its import stops at "operator torchvision::nms does not exist". `.ci/run` installs
    it into `<venv>/test-vendor` (outside site-packages, so that only this process sees it, never the CLI runs
    tests start); declaring the two operator schemas its C extension would register lets its Python transforms,
    all that transformers' processors call, import. Done before transformers is imported: it looks for
    torchvision once, at import."""
    vendor = Path(sys.prefix) / "test-vendor"
    if not (vendor / "torchvision").is_dir() or "torchvision" in sys.modules:
        return
    import torch

    if torch.version.cuda:  # a CUDA torch: the wheel's C extension loads and registers the operators itself
        sys.path.append(str(vendor))
        return
    library = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _torchvision_for_cpu_torch.library = library  # kept alive: dropping it removes the schemas
    sys.path.append(str(vendor))


_torchvision_for_cpu_torch()

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: no spinning threads
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
# class images drawn by tests go to a throw-away cache, not the user's ~/.cache/finetune
os.environ.setdefault("FINETUNE_CACHE", tempfile.mkdtemp(prefix="finetune-test-cache-"))

# after the environment above: helpers imports finetune, and the hub reads HF_HUB_OFFLINE once, at import
from tests.helpers import draw_concept, mount_tmpfs, pipeline, reset_accelerate  # noqa: E402


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    from finetune.models.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd", seed=0)


@pytest.fixture(scope="session")
def concept_dir(tmp_path_factory) -> Path:
    return draw_concept(tmp_path_factory.mktemp("data") / "concept")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps process-wide singletons; each in-process training run starts from a clean one."""
    yield
    reset_accelerate()


UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]  # conv1: 3x3 convs (LoCon)
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


@pytest.fixture(scope="session")
def lora_file(tiny_base, tmp_path_factory):
    """A diffusers-format LoRA on U-Net (attention, proj_in 1x1 and 3x3 convs) and text encoder, with alpha
    unlike the rank (scale != 1) and weights big enough to change every output."""
    from peft import LoraConfig
    import torch

    from finetune.export.lora import diffusers as diffusers_lora
    from finetune.networks import peft_layers

    pipe = pipeline(tiny_base)
    torch.manual_seed(3)
    configs = {"unet": LoraConfig(r=4, lora_alpha=2, target_modules=UNET_TARGETS),
               "text_encoder": LoraConfig(r=2, lora_alpha=4, target_modules=TEXT_TARGETS)}
    for name, config in configs.items():
        module = getattr(pipe, name)
        peft_layers.inject(module, config)
        for parameter_name, parameter in module.named_parameters():
            if "lora_B" in parameter_name:
                parameter.data.normal_(0, 0.3)
    components = {name: peft_layers.state_dict(getattr(pipe, name)) for name in configs}
    recipe = {"train": {"learning_rate": 1e-4, "max_steps": 7, "seed": 5}, "data": {"resolution": 32},
              "strategy": {"kind": "lora", "rank": 4}, "model": {"base": str(tiny_base)}}
    metadata = {"finetune.base_model": str(tiny_base), "finetune.steps": "7", "finetune.recipe": json.dumps(recipe)}
    path = tmp_path_factory.mktemp("lora") / "ours.safetensors"
    return diffusers_lora.save_lora(path, components, {n: c.to_dict() for n, c in configs.items()}, metadata)


@pytest.fixture
def small_disk(tmp_path):
    """A real file system with 64 KiB of room."""
    yield mount_tmpfs(tmp_path / "small", "size=64k")
    subprocess.run(["umount", "--lazy", str(tmp_path / "small")], check=True)


@pytest.fixture
def read_only_disk(tmp_path):
    """A real read-only file system."""
    yield mount_tmpfs(tmp_path / "ro", "size=64k,ro")
    subprocess.run(["umount", "--lazy", str(tmp_path / "ro")], check=True)
