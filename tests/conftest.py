"""Shared fixtures: a tiny Stable Diffusion pipeline built from configs, and a tiny image folder."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from PIL import Image, ImageDraw


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


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    from finetune.models.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd", seed=0)


def draw_concept(folder: Path, count: int = 4, caption: str = "a purple sks", size: int = 32) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = Image.new("RGB", (size, size), "white")
        offset = 2 * i
        ImageDraw.Draw(image).polygon(
            [(16 + offset, 2), (30, 28 - offset), (2 + offset, 28)], fill=(128, 0, 160))
        image.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)
    return folder


@pytest.fixture(scope="session")
def concept_dir(tmp_path_factory) -> Path:
    return draw_concept(tmp_path_factory.mktemp("data") / "concept")


BASE_RECIPE = {
    "strategy": {"kind": "lora", "rank": 4, "alpha": 8},
    "data": {"resolution": 32},
    "train": {"max_steps": 4, "learning_rate": 1e-3, "seed": 0},
    "checkpoint": {"every": 0},
}


def allowed_by(spec, strategy: dict) -> dict:
    """`strategy` (a recipe's strategy section) without the options the family's spec refuses for its kind (its
    `refuses` "kind.option" keys: Chroma's text-encoder LoRA), so that contract runs train what the family trains."""
    refused = {key.partition(".")[2] for key in spec.refuses if key.startswith(f"{strategy['kind']}.")}
    return {key: value for key, value in strategy.items() if key not in refused}


def recipe_dict(base: Path, images: Path, output_dir: Path, **sections) -> dict:
    """A small LoRA recipe; `sections` are merged into the matching sections (a strategy of another kind
    replaces the LoRA one)."""
    data = copy.deepcopy(BASE_RECIPE)
    data["model"] = {"base": str(base)}
    data["data"]["images"] = str(images)
    data["output_dir"] = str(output_dir)
    for key, value in sections.items():
        if key == "strategy" and value.get("kind") != data["strategy"]["kind"]:
            data["strategy"] = dict(value)  # another strategy brings its own options
        elif isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    return data


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps process-wide singletons; each in-process training run starts from a clean one."""
    yield
    reset_accelerate()


def pipeline(path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(path))


def images(pipe):
    """Two denoising steps from a fixed seed: enough to tell one model's images from another's."""
    import torch

    generator = torch.Generator().manual_seed(0)
    return pipe(prompt=["a purple sks"], num_inference_steps=2, generator=generator, output_type="np",
                height=32, width=32).images


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


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def train_keeping_parts(recipe, on_load=None):
    """Train with the recipe's family, returning (artifact, the loaded components in eval mode) so a test can
    compare the trained model with what a file loads back; `on_load(parts)` runs right after loading (e.g. to
    hook a module). accelerate's singletons are reset for module-scoped use."""
    from finetune.models import family_for
    from finetune.training import loop

    kept = {}
    family = family_for(recipe.model.family, recipe.model.base)

    class KeepParts(type(family)):
        def load(self, *args, **kwargs):
            kept["parts"] = super().load(*args, **kwargs)
            if on_load is not None:
                on_load(kept["parts"])
            return kept["parts"]

    original = loop.family_for
    loop.family_for = lambda name, base=None, hub=False: KeepParts(family.spec)
    try:
        artifact = loop.train(recipe)
    finally:
        loop.family_for = original
        reset_accelerate()
    for module in kept["parts"].modules.values():
        module.eval()
    return artifact, kept["parts"]


def saved_pipeline(path):
    """A pipeline folder as diffusers loads it (the class its model_index.json names), progress bars off."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images_of(pipe, prompt: str = "a purple sks", guidance_scale: float = 3.0):
    """One 32 px image for `prompt` from a fixed seed in two steps: what round-trip tests compare."""
    import torch

    generator = torch.Generator().manual_seed(0)
    return pipe(prompt=[prompt], num_inference_steps=2, guidance_scale=guidance_scale, height=32, width=32,
                generator=generator, output_type="np").images


def train_shipped_recipe(name: str, base: Path, tmp_path: Path, extra: tuple[str, ...] = ()) -> Path:
    """`finetune validate` then `train` of recipes/<name>.yaml as shipped, on a tiny `base` at 32 px for two steps
    (the real base needs the hub); returns the output folder. `extra`: overrides the tiny model needs."""
    from finetune.cli import main

    recipe = Path(__file__).parents[1] / "recipes" / f"{name}.yaml"
    overrides = [f"model.base={base}", "data.resolution=32", "train.max_steps=2", "train.mixed_precision=no",
                 "train.gradient_checkpointing=false", "train.lr_warmup_steps=0", "sample.every=0",
                 "checkpoint.every=0", "log.to=[]", f"output_dir={tmp_path / 'out'}",
                 "prior.num_class_images=2", "prior.steps=2", f"prior.class_data_dir={tmp_path / 'class'}", *extra]
    assert main(["validate", str(recipe), *overrides]) == 0
    assert main(["train", str(recipe), *overrides]) == 0
    return tmp_path / "out"


def mount_tmpfs(folder: Path, options: str) -> Path:
    """A real tmpfs at `folder` (made here) with mount `options` ("size=64k", "size=64k,ro"): the errors a full or
    read-only disk really raises. Skips the test where it cannot mount (not root, or a sandbox that refuses)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("this machine does not let us mount a tmpfs")
    return folder


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
