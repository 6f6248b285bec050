"""What test modules share: recipes and images, pipelines, training helpers, the strategy tables, per-family
hooks. Test modules import from here and from finetune, never from one another (tests/unit/test_suite_layout.py
checks it); conftest.py holds only fixtures and the test environment."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pytest
from PIL import Image, ImageDraw

from finetune.models import specs
from finetune.strategies import KINDS

# ---- recipes and images ----------------------------------------------------------------------------------------

BASE_RECIPE = {
    "strategy": {"kind": "lora", "rank": 4, "alpha": 8},
    "data": {"resolution": 32},
    "train": {"max_steps": 4, "learning_rate": 1e-3, "seed": 0},
    "checkpoint": {"every": 0},
}


def draw_concept(folder: Path, count: int = 4, caption: str = "a purple sks", size: int = 32) -> Path:
    """`count` captioned images of a purple triangle, each shifted a little, in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = Image.new("RGB", (size, size), "white")
        offset = 2 * i
        ImageDraw.Draw(image).polygon(
            [(16 + offset, 2), (30, 28 - offset), (2 + offset, 28)], fill=(128, 0, 160))
        image.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)
    return folder


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


# ---- pipelines -------------------------------------------------------------------------------------------------

def pipeline(path):
    """A Stable Diffusion pipeline folder, loaded."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(path))


def images(pipe):
    """Two denoising steps from a fixed seed: enough to tell one model's images from another's."""
    import torch

    generator = torch.Generator().manual_seed(0)
    return pipe(prompt=["a purple sks"], num_inference_steps=2, generator=generator, output_type="np",
                height=32, width=32).images


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


# ---- training --------------------------------------------------------------------------------------------------

def reset_accelerate() -> None:
    """accelerate's process-wide singletons as a fresh process has them."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def train_keeping_parts(recipe, before_steps=None):
    """Train with the recipe's family, returning (artifact, the trained components in eval mode) so a test can
    compare the trained model with what a file loads back; `before_steps(parts)` runs once the run is set up,
    before its first step (e.g. to hook a module). accelerate's singletons are reset for module-scoped use."""
    from finetune.training import loop

    try:
        with loop.setup(recipe) as run:
            if before_steps is not None:
                before_steps(run.parts)
            loop.run_steps(run)
            artifact = loop.finish(run)
    finally:
        reset_accelerate()
    for module in run.parts.modules.values():
        module.eval()
    return artifact, run.parts


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


def declares_data_control() -> bool:
    """Whether the recipe schema has `data.control` (issue 38's paired data): the edit recipes need it."""
    import dataclasses

    from finetune.recipe.schema import DataOptions

    return any(field.name == "control" for field in dataclasses.fields(DataOptions))


def default_objective(family, parts):
    """The family's objective as a recipe that sets none of its options gives it."""
    return family.objective(parts, family.spec.options())


def fixed_loss(family, parts, pixels, captions) -> float:
    """Loss on fixed noise and timesteps (the family's objective with its defaults, drawn from a fixed seed):
    comparable before and after training."""
    import torch

    from finetune.data.dataset import uncropped_conditions
    from finetune.training.step import per_sample_loss

    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        latents = family.encode_images(parts, pixels, generator)
        cond = family.encode_prompts(parts, captions)
        noised = default_objective(family, parts).noise(latents, generator)
        prediction = family.predict(parts, noised.noisy, noised.timesteps, cond,
                                    uncropped_conditions(len(captions), *pixels.shape[-2:]))
    return per_sample_loss(prediction, noised.target).mean().item()


class Crash(Exception):
    """What crash_at_step_3 raises."""


def crash_at_step_3(step: int) -> None:
    """An `on_step` callback: stops a run after step 2's checkpoint, before step 3's files, like a kill mid-run."""
    if step == 3:
        raise Crash


# the run's report records wall-clock times and durations, which no two runs share; its history's steps, losses
# and learning rates are compared instead (history_of)
REPORT_FILES = {"history.jsonl", "run.json", "report.html"}


def files_under(root: Path) -> dict[str, bytes]:
    """Every file under root, by path relative to it, but the report's. Nothing else is excluded: with the
    default recipe (no trackers, so no logs folder; no sample grids) a run writes only what it was asked to, and
    all of it should repeat."""
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*"))
            if path.is_file() and path.relative_to(root).as_posix() not in REPORT_FILES}


def straight_and_resumed(recipe, kept: Path) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """files_under the run's output_dir when `recipe` trains straight through, and when it is stopped after step
    3 (crash_at_step_3) and resumed from its latest checkpoint. The straight run's folder moves to `kept` (its
    history stays readable there with history_of)."""
    import shutil

    from finetune.training.loop import train

    out = Path(recipe.output_dir)
    train(recipe)
    uninterrupted = files_under(out)
    shutil.move(out, kept)
    reset_accelerate()
    with pytest.raises(Crash):
        train(recipe, on_step=crash_at_step_3)
    reset_accelerate()
    train(recipe, resume="latest")
    return uninterrupted, files_under(out)


def history_of(root: Path) -> list[tuple]:
    """(step, loss, learning rate) of each step in the run's history.jsonl."""
    from finetune.report.history import read_history

    return [(r["step"], r["loss"], r["lr"]) for r in read_history(root)]


# ---- runs in a child process -----------------------------------------------------------------------------------

# the progress line of every step (without a terminal a bar writes one every 30 s): the tests watch it
PER_STEP = {"FINETUNE_PROGRESS_SECONDS": "0"}


def start_training(path, *extra):
    """`finetune train path *extra` in a child process, one thread, a progress line every step on its stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **PER_STEP}
    return subprocess.Popen([sys.executable, "-m", "finetune", "train", str(path), *extra], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, env=env)


def wait_for_progress(process, pattern: str, timeout: float = 300) -> bool:
    """Read the child's stderr until `pattern` shows up (True) or the child ends (False)."""
    seen = ""
    for chunk in iter(lambda: process.stderr.read(16), ""):
        seen += chunk
        if pattern in seen:
            return True
    return False


# ---- the strategy tables ---------------------------------------------------------------------------------------

LORA = {"kind": "lora", "rank": 4, "alpha": 8}
# what each strategy's runs set beyond its defaults where that widens what is compared (a strategy of KINDS not
# named here runs with its defaults, so a new one is in the table the day it is registered; one that needs an
# option fails validate there until it is named here)
_OPTIONS_BEYOND_DEFAULTS = {
    "lora": LORA,
    # the text encoder trains for its first 2 of 3 steps, so stopping it part-way is covered too
    "dreambooth": {"kind": "dreambooth", "text_encoder": True, "text_encoder_steps": 2},
    # a1111_pt: the pickled .pt is written too, so its bytes are held to the same standard
    "textual_inversion": {"kind": "textual_inversion", "placeholder_token": "<sks>", "initializer_token": "x",
                          "num_vectors": 2, "a1111_pt": True},
    "hypernetwork": {"kind": "hypernetwork", "layer_structure": [1, 2, 1], "activation": "relu", "a1111_pt": True},
}
# every registered strategy (finetune.strategies.KINDS), and LoRA once more with kohya's file: the determinism
# table, also run by the summary and file-permission tests
STRATEGIES = {}
for _kind in KINDS:
    STRATEGIES[_kind] = _OPTIONS_BEYOND_DEFAULTS.get(_kind, {"kind": _kind})
    if _kind == "lora":
        STRATEGIES["lora_with_kohya_file"] = {**LORA, "formats": ["diffusers", "kohya"]}


@dataclass(frozen=True)
class Contract:
    options: dict
    prompt: str  # a prompt the strategy's effect shows in
    learning_rate: float  # moves it in 12 steps
    base_prompt: str  # what `prompt` must compute like before prepare (textual inversion: its initializer word)
    base_weights: tuple[str, ...] = ()  # the base's own weights it may change ("component." prefixes or names)


# how each strategy runs under the strategy contract (tests/contracts/test_strategy_contract.py)
CONTRACT = {
    "lora": Contract({"kind": "lora", "rank": 4, "text_encoder": True}, "a purple sks", 5e-3, "a purple sks"),
    "dreambooth": Contract({"kind": "dreambooth", "text_encoder": True}, "a purple sks", 1e-4, "a purple sks",
                           ("unet.", "transformer.", "text_encoder.", "text_encoder_2.")),
    "textual_inversion": Contract(
        {"kind": "textual_inversion", "placeholder_token": "<sks>", "initializer_token": "x"}, "a purple <sks>",
        5e-2, "a purple x", ("text_encoder.embeddings.token_embedding.weight",  # CLIP-L (transformers >= 5.6)
                              "text_encoder.text_model.embeddings.token_embedding.weight",  # SD3's CLIP-L
                              "text_encoder_2.text_model.embeddings.token_embedding.weight")),  # CLIP-G
    "hypernetwork": Contract({"kind": "hypernetwork", "layer_structure": [1, 2, 1]}, "a purple sks", 5e-3,
                             "a purple sks"),
}

# (strategy, family) pairs a family refuses (its spec's `refuses`), by name, before any long work
NOT_YET = {(kind, spec.name): f"{kind.replace('_', ' ')} on {spec.name} is not written yet"
           for spec in specs().values() for kind in spec.refuses if "." not in kind}


# ---- per-family hooks ------------------------------------------------------------------------------------------

def loaded_family(folder: Any, **options: Any) -> tuple[Any, Any, Any]:
    """(family, parts, pipeline) for a tiny base folder: the family told from it, its parts loaded with `options`
    (the family's model keys), and the pipeline built on them without a progress bar."""
    from finetune.models import family_for

    family = family_for("auto", str(folder))
    parts = family.load(str(folder), options=family.spec.options(base=str(folder), **options))
    pipe = family.pipeline(parts)
    pipe.set_progress_bar_config(disable=True)
    return family, parts, pipe


def recording(transformer, calls: list, keep: Iterable[str] | None = None) -> Any:
    """A forward pre-hook appending each call's inputs to `calls`, tensors cloned: its keywords (only those in
    `keep`, when given) and a positional first input as `hidden_states`. Returns the hook's handle."""
    import torch

    keep = set(keep) if keep is not None else None

    def record(module, args, kwargs):
        found = {**({"hidden_states": args[0]} if args else {}), **kwargs}
        calls.append({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in found.items()
                      if keep is None or k in keep})
    return transformer.register_forward_pre_hook(record, with_kwargs=True)


def noise_image(width: int, height: int, seed: int = 1) -> Image.Image:
    """A width x height RGB image of uniform noise: a control image every pixel of which matters."""
    import numpy as np

    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def control_latents_of(family, parts, images: Iterable[Image.Image]) -> list:
    """`conditions["control_latents"]` for a batch of one with these control images (one per slot), made as
    training makes them: pixels in [-1, 1] (the pipelines' image processor: x / 255 x 2 - 1), the VAE's means
    (`family.encode_image_moments`), `family.control_latents`."""
    import numpy as np
    import torch

    latents = []
    for image in images:
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
        with torch.no_grad():
            mean = family.encode_image_moments(parts, (pixels * 2 - 1)[None])[0]
            latents.append(family.control_latents(parts, mean))
    return latents


def flux_prediction(transformer):
    """A tiny Flux transformer's output for fixed tokens, text, pooled vector, sigma and guidance."""
    import torch
    from diffusers import FluxPipeline

    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return transformer(hidden_states=torch.randn(1, 16, 16, generator=generator),
                           encoder_hidden_states=torch.randn(1, 8, 32, generator=generator),
                           pooled_projections=torch.randn(1, 32, generator=generator), timestep=torch.tensor([0.5]),
                           guidance=torch.tensor([3.5]), txt_ids=torch.zeros(8, 3),
                           img_ids=FluxPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32),
                           return_dict=False)[0]


# ---- LoRA files as kohya names them ----------------------------------------------------------------------------

def kohya_stem(component: str, module: str) -> str:
    """kohya's own name for a Stable Diffusion module, written out independently of finetune's reader."""
    prefix = "lora_unet_" if component == "unet" else "lora_te_text_model_"
    return prefix + module.removeprefix("text_model.").replace(".", "_")  # diffusers files keep CLIP's text_model.


def applied_changes(pipe, name: str) -> dict:
    """Each adapted module's weight change as peft computes it for adapter `name`, by kohya name."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    changes = {}
    for component in ("unet", "text_encoder"):
        for module, layer in getattr(pipe, component).named_modules():
            if isinstance(layer, BaseTunerLayer) and name in layer.scaling:
                changes[kohya_stem(component, module)] = layer.get_delta_weight(name).float()
    return changes


# ---- disks -----------------------------------------------------------------------------------------------------

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
