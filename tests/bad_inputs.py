"""The catalogue of bad inputs: each one a test (tests/cli/test_bad_inputs.py) and a row of the troubleshooting
table in docs/troubleshooting.md, which `python -m tests.bad_inputs docs/troubleshooting.md` rewrites from this
list (without an argument it prints the table).

Each entry builds its bad input in a fresh workspace and returns the command line that meets it; the test
checks that `finetune` exits with 2, that the message holds the fragments in `says` (the problem and the fix),
whether a model was loaded first, and that nothing half-written is left in output_dir.
"""
from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from tests.helpers import draw_concept, recipe_dict, reset_accelerate

TI = {"kind": "textual_inversion", "placeholder_token": "<sks>", "initializer_token": "x"}


class Workspace:
    """A fresh image folder and output_dir beside the shared tiny base; writes recipes and side files."""

    def __init__(self, tmp: Path, base: Path, monkeypatch):
        self.tmp, self.base, self.monkeypatch = tmp, base, monkeypatch
        self.images = draw_concept(tmp / "images")
        self.out = tmp / "out"
        self.recipe_path = tmp / "recipe.yaml"

    def recipe(self, text: str | None = None, **sections) -> str:
        """Write the small LoRA recipe with `sections` merged in (or `text` as it stands); return its path."""
        out = Path(sections.pop("output_dir", self.out))
        data = recipe_dict(self.base, self.images, out, **sections)
        self.recipe_path.write_text(text if text is not None else yaml.safe_dump(data))
        return str(self.recipe_path)

    def train(self, *extra: str, **sections) -> list[str]:
        return ["train", self.recipe(**sections), *extra]

    def run(self, argv: list[str]) -> None:
        """A run that must succeed, to set the stage (a checkpoint to resume, say)."""
        from finetune.cli import main

        assert main(argv) == 0
        reset_accelerate()

    def fail_writes(self, after: int) -> None:
        """Simulate a full disk: the safetensors write after the first `after` ones writes half a file, then
        fails as safetensors (0.8) does on a full disk: SafetensorError, the OS error only in its text (the same
        on a real small tmpfs: tests/cli/test_file_errors.py)."""
        from safetensors import SafetensorError

        from finetune.io import safetensors_io

        calls = []
        real = safetensors_io.save_file

        def save_file_on_a_full_disk(tensors, filename, metadata=None):
            calls.append(filename)
            if len(calls) <= after:
                return real(tensors, filename, metadata=metadata)
            Path(filename).write_bytes(b"\0" * 100)
            raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(errno.ENOSPC)} "
                                  f"(os error {errno.ENOSPC})")

        self.monkeypatch.setattr(safetensors_io, "save_file", save_file_on_a_full_disk)


@dataclass(frozen=True)
class BadInput:
    name: str
    problem: str  # docs/troubleshooting.md: what the user did or met
    answer: str  # docs/troubleshooting.md: what finetune does about it and what to do
    make: Callable[[Workspace], list[str]]  # builds the bad input; returns the `finetune` command line
    says: tuple[str, ...]  # fragments of the message: the problem and the fix
    loads_model: bool = False  # True only where the check needs the model (or the model is the bad input)
    then: Callable[[Workspace], None] | None = None  # further checks, e.g. that a kept checkpoint resumes


def _image_file(ws: Workspace, name: str, content: bytes | None = None, caption: str = "a purple sks") -> Path:
    path = ws.images / name
    if content is None:
        Image.new("RGB", (16, 16), "red").save(path)
    else:
        path.write_bytes(content)
    path.with_suffix(".txt").write_text(caption)
    return path


def _control_image(ws: Workspace) -> Path:
    """An edit's control image beside the workspace's images (not among them)."""
    path = ws.tmp / "before.png"
    Image.new("RGB", (32, 32), "red").save(path)
    return path


def _masks(ws: Workspace, leave_out: str = "", size_of: dict[str, tuple[int, int]] | None = None) -> Path:
    """A white mask per training image in tmp/masks, but `leave_out`'s; `size_of` gives some another size."""
    folder = ws.tmp / "masks"
    folder.mkdir(exist_ok=True)
    for image in sorted(ws.images.glob("*.png")):
        if image.stem != leave_out:
            Image.new("L", (size_of or {}).get(image.stem, (32, 32)), 255).save(folder / image.name)
    return folder


def _edit_pairs(ws: Workspace, leave_out: str = "", orphan: str = "", broken: str = "", references: str = "",
                edit_slots: int = 1, folders: int = 1, **data) -> list[str]:
    """`finetune train` with a control image per training image in tmp/controls (but `leave_out`'s, with a stray
    `orphan`, an unreadable `broken`, two numbered references for `references`), on the tiny base made an edit
    family taking `edit_slots` control images (0: as it ships, taking none)."""
    from dataclasses import replace

    from finetune.models import specs

    if edit_slots:
        ws.monkeypatch.setitem(specs(), "sd", replace(specs()["sd"], control_images=edit_slots))
    folder = ws.tmp / "controls"
    folder.mkdir(exist_ok=True)
    for image in sorted(ws.images.glob("*.png")):
        if image.stem == references:
            Image.new("RGB", (32, 32), "blue").save(folder / f"{image.stem}_0.png")
            Image.new("RGB", (32, 32), "green").save(folder / f"{image.stem}_1.png")
        elif image.stem != leave_out:
            Image.new("RGB", (32, 32), "blue").save(folder / image.name)
    if orphan:
        Image.new("RGB", (32, 32), "blue").save(folder / orphan)
    if broken:
        (folder / broken).write_bytes(b"not an image")
    return ws.train(data={"control": {"folders": [str(folder)] * folders}, **data})


def _truncated(ws: Workspace) -> list[str]:
    data = (ws.images / "0.png").read_bytes()
    (ws.images / "0.png").write_bytes(data[: len(data) // 2])
    return ws.train()


def _metadata(ws: Workspace, lines: str) -> list[str]:
    (ws.images / "metadata.jsonl").write_text(lines)
    return ws.train()


def _pickled_base(ws: Workspace) -> list[str]:
    class WritesAFile:
        def __reduce__(self):
            return (open, (str(ws.tmp / "pwned.txt"), "w"))

    torch.save({"state_dict": {"model.diffusion_model.x": WritesAFile()}}, ws.tmp / "model.ckpt")
    return ws.train(model={"base": str(ws.tmp / "model.ckpt")})


def _not_writable(ws: Workspace) -> list[str]:
    if os.geteuid() == 0:  # root writes through permission bits; a read-only mount stops it
        return ws.train(output_dir="/sys/finetune-out")
    locked = ws.tmp / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return ws.train(output_dir=str(locked / "out"))


def _lora_for_another_base(ws: Workspace) -> Path:
    """A LoRA on a cross-attention key projection fed by a 768-wide text encoder; the tiny base's is 32 wide."""
    stem = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    path = ws.tmp / "sd15_lora.safetensors"
    save_file({f"{stem}.lora_A.weight": torch.zeros(4, 768), f"{stem}.lora_B.weight": torch.zeros(32, 4)}, str(path))
    return path


def _resume_another_recipe(ws: Workspace) -> list[str]:
    ws.run(ws.train(train={"max_steps": 2}, checkpoint={"every": 1}))
    return ws.train("--resume", "latest", strategy={"kind": "lora", "rank": 8}, checkpoint={"every": 1})


def _pixart_base(ws: Workspace) -> list[str]:
    folder = ws.tmp / "pixart"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "PixArtSigmaPipeline"}')
    return ws.train(model={"base": str(folder)})


def _sdxl_base_as_sd(ws: Workspace) -> list[str]:
    folder = ws.tmp / "sdxl"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    return ws.train(model={"base": str(folder), "family": "sd"})


def _placeholder_past_the_window(ws: Workspace) -> list[str]:
    # 52 tokens of text before the placeholder; the tiny base's window holds 30
    for caption in ws.images.glob("*.txt"):
        caption.write_text("a round object on a plain white background in soft studio light, <sks>")
    return ws.train(strategy=TI)


def _second_run_in_a_finished_output_dir(ws: Workspace) -> list[str]:
    ws.run(ws.train(train={"max_steps": 2}, checkpoint={"every": 1}))
    return ws.train(train={"max_steps": 3})


def _resume_a_finished_run(ws: Workspace) -> list[str]:
    ws.run(ws.train(train={"max_steps": 2}))
    return ws.train("--resume", "latest", train={"max_steps": 2})


def _checkpoint_kept_and_resumable(ws: Workspace) -> None:
    from safetensors.torch import load_file

    kept = ws.out / "checkpoints" / "step-000001"
    assert sorted(p.name for p in (ws.out / "checkpoints").iterdir()) == ["step-000001"]
    assert all(torch.isfinite(t).all() for t in load_file(kept / "trainable.safetensors").values())


def _resumes_once_there_is_room(ws: Workspace) -> None:
    _checkpoint_kept_and_resumable(ws)
    ws.monkeypatch.undo()  # space freed
    reset_accelerate()
    ws.run(ws.train("--resume", "latest", checkpoint={"every": 1}))
    assert (ws.out / "pytorch_lora_weights.safetensors").is_file()


def _cut_in_half(path: Path) -> Path:
    """Keep the first half of a real file, as an interrupted download or copy leaves it."""
    os.truncate(path, path.stat().st_size // 2)
    return path


def _half_lora(ws: Workspace) -> Path:
    """A LoRA file the tiny base trained, cut in half."""
    ws.run(ws.train(train={"max_steps": 1}, output_dir=ws.tmp / "lora-run"))
    half = ws.tmp / "half.safetensors"
    shutil.copy(ws.tmp / "lora-run" / "pytorch_lora_weights.safetensors", half)
    return _cut_in_half(half)


def _base_with_unet_cut_short(ws: Workspace) -> Path:
    """A copy of the tiny base whose U-Net weights file lost its second half."""
    base = Path(shutil.copytree(ws.base, ws.tmp / "cut-base"))
    _cut_in_half(base / "unet" / "diffusion_pytorch_model.safetensors")
    return base


def _unwritable(ws: Workspace) -> Path:
    """A folder that cannot be made: under a read-only mount for root (permission bits do not stop root), in a
    folder without write permission otherwise."""
    if os.geteuid() == 0:
        return Path("/sys/finetune-cache")
    locked = ws.tmp / "locked"
    locked.mkdir(exist_ok=True)
    locked.chmod(0o500)
    return locked / "finetune-cache"


DAMAGED_RUN = dict(train={"max_steps": 3}, checkpoint={"every": 1})


def _damaged_checkpoint(ws: Workspace, damage: Callable[[Path], object]) -> list[str]:
    """A run of 3 steps (its own output_dir, so the catalogue's whole-files check meets nothing it damaged)
    whose newest checkpoint is then damaged; resumed with --resume latest."""
    out = ws.tmp / "run"
    ws.run(ws.train(output_dir=out, **DAMAGED_RUN))
    shutil.copy(out / "pytorch_lora_weights.safetensors", ws.tmp / "uninterrupted.safetensors")
    damage(out / "checkpoints" / "step-000002")  # the newest: the last step writes the artifact instead
    return ws.train("--resume", "latest", output_dir=out, **DAMAGED_RUN)


def _resumes_exactly_from_the_good_one(ws: Workspace) -> None:
    """The offered command (--resume the step-1 checkpoint) trains steps 2 and 3 again, to the very same
    weights."""
    from safetensors.torch import load_file

    out = ws.tmp / "run"
    ws.run(ws.train("--resume", str(out / "checkpoints" / "step-000001"), output_dir=out, **DAMAGED_RUN))
    again, before = (load_file(str(p)) for p in (out / "pytorch_lora_weights.safetensors",
                                                  ws.tmp / "uninterrupted.safetensors"))
    assert again.keys() == before.keys() and all(torch.equal(again[k], before[k]) for k in again)


def _no_code_ran(ws: Workspace) -> None:
    assert not (ws.tmp / "pwned.txt").exists(), "the pickle ran code"


CATALOGUE = [
    # the recipe
    BadInput("unknown-key", "A misspelled key in the recipe (`strategy.rnak`)",
             "Names the key and the closest valid one; fix the spelling",
             lambda ws: ws.train(strategy={"kind": "lora", "rnak": 8}),
             ("strategy.rnak", "did you mean 'strategy.rank'")),
    BadInput("unknown-override", "A misspelled key on the command line (`train.max_step=10`)",
             "Same as in the file: the closest valid key is named",
             lambda ws: ws.train("train.max_step=10"), ("train.max_step", "did you mean 'train.max_steps'")),
    BadInput("wrong-type", "A value of the wrong type (`max_steps: many`)",
             "Names the key and the type it needs",
             lambda ws: ws.train(train={"max_steps": "many"}), ("train.max_steps: expected an integer",)),
    BadInput("wrong-choice", "A value outside a key's choices (`mixed_precision: fp8`)",
             "Lists the valid choices",
             lambda ws: ws.train(train={"mixed_precision": "fp8"}), ("train.mixed_precision", "'bf16'")),
    BadInput("zero-steps", "Zero or negative `train.max_steps`", "Says it must be at least 1",
             lambda ws: ws.train(train={"max_steps": 0}), ("train.max_steps: must be at least 1",)),
    BadInput("negative-learning-rate", "Zero or negative learning rate", "Says it must be positive",
             lambda ws: ws.train(train={"learning_rate": -1e-4}), ("train.learning_rate: must be positive",)),
    BadInput("infinite-learning-rate", "A learning rate of `.inf` or `.nan`", "Says it must be positive",
             lambda ws: ws.train(train={"learning_rate": float("inf")}), ("train.learning_rate: must be positive",)),
    BadInput("zero-rank", "Zero or negative LoRA rank", "Says it must be at least 1",
             lambda ws: ws.train(strategy={"kind": "lora", "rank": 0}), ("strategy.rank: must be at least 1",)),
    BadInput("unknown-strategy", "An unknown `strategy.kind`", "Lists the strategies and the closest one",
             lambda ws: ws.train(strategy={"kind": "lorra"}), ("strategy.kind", "'lora'")),
    BadInput("yaml-syntax", "A recipe that is not valid YAML", "Quotes the parser's line and column",
             lambda ws: ["train", ws.recipe(text="train:\n  max_steps: [4\n")], ("not valid YAML", "line")),
    BadInput("recipe-missing", "A recipe path that does not exist", "Says so before anything else",
             lambda ws: ["train", str(ws.tmp / "nowhere.yaml")], ("recipe file not found",)),
    BadInput("fp16-on-cpu", "`mixed_precision: fp16` on a machine without a GPU", "Suggests bf16 or no",
             lambda ws: ws.train(train={"mixed_precision": "fp16"}), ("fp16 needs a GPU", "bf16")),
    BadInput("resolution-not-divisible", "A resolution the base's VAE cannot divide (`resolution: 34`)",
             "Says it must be a multiple of what this base's VAE downsamples by (8 for Stable Diffusion) and suggests one",
             lambda ws: ws.train(data={"resolution": 34}),
             ("multiple of 4 (this base's VAE downsamples by 4)", "try 32")),
    BadInput("buckets-none-fit", "Bucketing with a smallest side the resolution cannot hold "
             "(`bucket_min_side: 256` at 32 px)", "Names a smallest side that fits, or to leave it unset",
             lambda ws: ws.train(data={"bucketing": True, "bucket_min_side": 256}),
             ("256 leaves no bucket", "lower data.bucket_min_side to 32", "leave it unset")),
    BadInput("prior-without-class-prompt", "Prior preservation without a class prompt",
             "Asks for `prior.class_prompt`, with an example",
             lambda ws: ws.train(prior={"mode": "base_prediction"}), ("prior.class_prompt", "a photo of a dog")),
    # issue 36: prompts
    BadInput("sample-prompt-unknown-key", "A sample prompt's mapping with a key it does not take (`size: 64`)",
             "Names the prompt and the key, and lists the keys a prompt takes",
             lambda ws: ws.train(sample={"every": 1, "prompts": ["a purple sks", {"prompt": "a sks", "size": 64}]}),
             ("sample.prompts[1]: unknown key size", "prompt, negative_prompt, seed, steps, guidance, width, height")),
    BadInput("prompt-file-size-not-divisible", "A line of `sample.prompt_file` (kohya's format) asking for a "
             "size the base's VAE cannot divide (`--w 30`)", "Names the file and line, the multiple, and a size "
             "that fits", lambda ws: (ws.tmp / "prompts.txt").write_text("# rows\na purple sks --w 30 --d 3\n")
             and ws.train(sample={"every": 1, "prompt_file": str(ws.tmp / "prompts.txt")}),
             ("prompts.txt:2: width 30 must be a multiple of 4 (this base's VAE downsamples by 4)", "try 32")),
    # issue 38: sampling with control images
    BadInput("sample-control-image-not-an-edit-model", "A sample prompt's `control_image` (or `finetune sample "
             "--control`) for a family that is no edit model", "Names the prompt and the family, and the families that "
             "take control images", lambda ws: ws.train(sample={"every": 1, "prompts": [
                 {"prompt": "a sks", "control_image": str(_control_image(ws))}]}),
             ("sample.prompts[0]: control_image: Stable Diffusion 1.x/2.x (sd) is no edit model", "remove "
              "control_image, or sample an edit model", "flux_kontext")),
    BadInput("sample-control-image-missing", "A sample prompt's `control_image` that does not exist",
             "Names the prompt and the file, and where relative paths are read from",
             lambda ws: ws.train(sample={"every": 1, "prompts": [
                 {"prompt": "a sks", "control_image": str(ws.tmp / "before.png")}]}),
             ("control_image: ", "before.png does not exist", "give the path of an image file")),
    BadInput("sample-control-on-a-base-that-is-no-edit-model", "`finetune sample --control` on a base of a family "
             "that is no edit model", "Refuses it before the base loads, naming the family",
             lambda ws: ["sample", "--base", str(ws.base), "--prompt", "a sks", "--control",
                         str(_control_image(ws)), "--out", str(ws.tmp / "grid.png")],
             ("--control / control_image: Stable Diffusion 1.x/2.x (sd) is no edit model",)),
    # issue 36: offload
    BadInput("offload-on-a-unet", "`train.offload` on a U-Net family (Stable Diffusion, SDXL)",
             "Says a U-Net has no list of transformer blocks to stream, and what saves memory there",
             lambda ws: ws.train(train={"offload": {"blocks": 2}, "gradient_checkpointing": True}),
             ("train.offload", "is a U-Net", "remove train.offload")),
    BadInput("offload-without-checkpointing", "`train.offload` without gradient checkpointing",
             "Asks for `train.gradient_checkpointing: true` and says why",
             lambda ws: ws.train(train={"offload": {"blocks": 0.5}}),
             ("needs train.gradient_checkpointing: true",)),
    # issue 36: optimizers
    BadInput("unknown-optimizer-argument", "An argument the optimizer does not take (`optimizer_args: {d_coeff: 1}` "
             "with prodigy)", "Names the optimizer's real arguments (read from its constructor) and the closest one",
             lambda ws: ws.train(train={"optimizer": "prodigy", "learning_rate": 1.0,
                                        "optimizer_args": {"d_coeff": 1.0}}),
             ("takes no argument 'd_coeff'", "did you mean 'd_coef'", "Its arguments: betas")),
    BadInput("prodigy-with-an-adamw-rate", "`optimizer: prodigy` with an AdamW learning rate such as 1e-4",
             "Says Prodigy's rate multiplies the step size it estimates (1.0 is usual) and how to take smaller steps",
             lambda ws: ws.train(train={"optimizer": "prodigy", "learning_rate": 1e-4}),
             ("with prodigy", "1.0 is usual", "d_coef")),
    # issue 36: ema
    BadInput("ema-decay-out-of-range", "`train.ema.decay` of 1 or more, or below 0",
             "Says it must be at least 0 and below 1, and how far back 0.999 and 0.99 average",
             lambda ws: ws.train(train={"ema": {"decay": 1.0}}),
             ("train.ema.decay: must be at least 0 and below 1", "got 1.0", "0.999 averages")),
    BadInput("ema-with-schedule-free", "`train.ema` with `train.optimizer: schedule_free_adamw`",
             "Refused: that optimizer's saved weights already are an average; leave train.ema out or choose "
             "another optimizer",
             lambda ws: ws.train(train={"ema": {}, "optimizer": "schedule_free_adamw"}),
             ("train.ema: not with train.optimizer: schedule_free_adamw", "leave train.ema out")),
    # the base model
    BadInput("base-missing", "`model.base` is a path that does not exist",
             "Says what it may be: a diffusers folder, a checkpoint file or a hub id",
             lambda ws: ws.train(model={"base": str(ws.tmp / "no-such-model")}),
             ("model.base", "does not exist", "hub id")),
    BadInput("hub-id-offline", "A hub id while offline (`HF_HUB_OFFLINE=1` or no network)",
             "Says the hub is out of reach and how to point at a local folder",
             lambda ws: ws.train(model={"base": "someone/not-a-real-model-xyz"}), ("HF_HUB_OFFLINE", "local"),
             loads_model=True),
    BadInput("base-weights-cut-short", "A file of the `model.base` folder cut short (an interrupted download or copy)",
             "Names the file and says to download or copy the model again",
             lambda ws: ws.train(model={"base": str(_base_with_unet_cut_short(ws))}),
             ("model.base: the weights file", "diffusion_pytorch_model.safetensors is cut short or damaged",
              "download or copy the model again"), loads_model=True),
    BadInput("not-a-pipeline", "`model.base` is a folder but not a diffusers pipeline",
             "Says model_index.json is missing and what to point at instead",
             lambda ws: ws.train(model={"base": str(ws.images)}), ("not a diffusers pipeline", "save_pretrained")),
    BadInput("family-not-trained-here", "`model.base` is a model of a family not trained here (PixArt-Sigma, ...)",
             "Names the family (from model_index.json or the file's keys) and what is trained today",
             _pixart_base, ("PixArt-Sigma pipeline", "finetune trains Stable Diffusion 1.x/2.x (sd)", "(sdxl)", "(sd3)")),
    BadInput("family-mismatch", "`model.family` says one family and the base is another (e.g. `sd` on an SDXL folder)",
             "Names both and what to set (the family, or auto)",
             _sdxl_base_as_sd, ("model.family: sd, but", "is a Stable Diffusion XL model", "set model.family: sdxl or auto")),
    BadInput("another-familys-option", "A `model` key only another family reads (e.g. `model.guidance`, Flux.1's, "
             "on an SD 1.x base)", "Names the key, the families that read it, and the family this model is",
             lambda ws: ws.train(model={"base": str(ws.base), "guidance": 1.0}),
             ("model.guidance: an option of model.family flux", "this model is sd", "set model.family")),
    BadInput("moved-key", "A recipe of an earlier version (`flow:` at the top, `train.min_snr_gamma`)",
             "Names each moved key's new place in the model section (`model.flow`, `model.min_snr_gamma`)",
             lambda ws: ws.train(train={"min_snr_gamma": 5.0}),
             ("train.min_snr_gamma: moved to model.min_snr_gamma",)),
    BadInput("pickled-checkpoint", "A `.ckpt` base that is a pickle which would run code",
             "Refused without running it (`weights_only=True`); convert it to .safetensors",
             _pickled_base, ("is a pickle", "could run code", "Convert it to .safetensors"), loads_model=True, then=_no_code_ran),
    # the images and captions
    BadInput("images-folder-missing", "`data.images` does not exist", "Names the folder",
             lambda ws: ws.train(data={"images": str(ws.tmp / "no-images")}), ("data.images", "not an existing")),
    BadInput("dataset-unreachable", "`data.dataset` names a hub dataset that cannot be reached (offline, a typo)",
             "Names the dataset and why; check the name and the connection, or use a local folder",
             lambda ws: ws.train(data={"images": None, "dataset": "nobody-here/no-such-dataset"}),
             ("data.dataset: 'nobody-here/no-such-dataset' could not be loaded", "save_to_disk folder")),
    BadInput("no-images", "An image folder without images", "Names the folder and the suffixes looked for",
             lambda ws: ws.train(data={"images": str((ws.tmp / "empty").mkdir() or ws.tmp / "empty")}),
             ("no images in", ".png")),
    BadInput("truncated-image", "A truncated image", "Names the file; remove it or set `data.on_bad_image: skip`",
             _truncated, ("0.png", "data.on_bad_image: skip")),
    BadInput("zero-byte-image", "A zero-byte image", "Names the file; remove it or set `data.on_bad_image: skip`",
             lambda ws: _image_file(ws, "9.png", b"") and ws.train(), ("9.png", "data.on_bad_image: skip")),
    BadInput("not-an-image", "A file that is not an image among the images",
             "Names the file; remove it or set `data.on_bad_image: skip`",
             lambda ws: _image_file(ws, "notes.png", b"these are my notes") and ws.train(),
             ("notes.png", "cannot identify image", "data.on_bad_image: skip")),
    BadInput("small-image", "Images smaller than the resolution, with `data.on_small_image: error`",
             "Names them; by default they are upscaled with a warning (`skip` leaves them out)",
             lambda ws: _image_file(ws, "9.png") and ws.train(data={"on_small_image": "error"}),
             ("9.png (16x16 for 32x32)", "lower data.resolution", "data.on_small_image: upscale")),
    BadInput("caption-missing", "An image without its caption file",
             "Names the images; add the captions or set `data.prompt`",
             lambda ws: (ws.images / "0.txt").unlink() or ws.train(), ("0.png", "data.prompt")),
    BadInput("caption-empty", "An empty caption file", "Names the images; write captions or set `data.prompt`",
             lambda ws: (ws.images / "0.txt").write_text("  \n") and ws.train(), ("empty caption", "data.prompt")),
    BadInput("caption-not-utf8", "A caption file that is not UTF-8", "Names the file; re-save it as UTF-8",
             lambda ws: (ws.images / "0.txt").write_bytes("caf\xe9".encode("latin-1")) and ws.train(),
             ("0.txt", "re-save it as UTF-8")),
    BadInput("metadata-bad-json", "A `metadata.jsonl` line that is not JSON", "Names the line",
             lambda ws: _metadata(ws, '{"file_name": "0.png", "text": "x"}\n{"file_name": "1.png",\n'),
             ("metadata.jsonl, line 2", "not valid JSON")),
    BadInput("metadata-missing-file", "A `metadata.jsonl` naming a file that is not there",
             "Names the line and the file",
             lambda ws: _metadata(ws, '{"file_name": "gone.png", "text": "x"}\n'),
             ("line 1", "gone.png not found")),
    # issue 36: validation
    BadInput("validation-holds-out-none", "`validation.images: 0.1` (a fraction held out) with too few images to "
             "hold any out", "Says how many images the fraction needs; raise it, or give a folder of held-out images",
             lambda ws: ws.train(validation={"images": 0.1, "every": 2}),
             ("validation.images: 0.1 of 4 image(s) holds out none", "at least 10 images", "validation.images: FOLDER")),
    BadInput("validation-folder-missing", "`validation.images` names a folder that does not exist",
             "Names it and says a fraction such as 0.1 holds out training images instead",
             lambda ws: ws.train(validation={"images": str(ws.tmp / "no-held-out")}),
             ("validation.images", "no-held-out is neither an existing folder", "fraction such as 0.1")),
    BadInput("validation-clip-model-missing", "`validation.clip_model` names a local folder that does not exist",
             "Names it and says to give a folder saved with save_pretrained or a hub id",
             lambda ws: ws.train(sample={"every": 2, "prompts": ["a purple sks"]},
                                 validation={"clip_model": str(ws.tmp / "no-clip")}),
             ("validation.clip_model", "no-clip is not an existing folder", "openai/clip-vit-base-patch32")),
    # issue 36: masks
    BadInput("mask-missing", "`data.masks: FOLDER` without a mask for one of the images",
             "Names the image and the mask looked for, before any model loads",
             lambda ws: _masks(ws, leave_out="2") and ws.train(data={"masks": str(ws.tmp / "masks")}),
             ("data.masks", "2.png: no mask 2.* in", "named as the image")),
    BadInput("mask-wrong-size", "A mask whose size differs from its image's",
             "Names the mask and both sizes, before any model loads",
             lambda ws: _masks(ws, size_of={"1": (16, 32)}) and ws.train(data={"masks": str(ws.tmp / "masks")}),
             ("1.png is 16x32, its image", "is 32x32", "mask of its size")),
    # issue 38: edit pairs (data.control)
    BadInput("control-missing", "A training image without its control image (`data.control.folders`)",
             "Names the image and the control image looked for, before any model loads",
             lambda ws: _edit_pairs(ws, leave_out="2"),
             ("data.control", "2.png: no control image 2.* (or 2_0.*", "named as the image")),
    BadInput("control-orphan", "A control image with no training image of its name",
             "Names the control image, before any model loads: name it as its target, or move it out",
             lambda ws: _edit_pairs(ws, orphan="9.png"),
             ("9.png: no training image 9.* in data.images", "move out the control images")),
    BadInput("control-unreadable", "A control image that cannot be read",
             "Names the file and the training image it belongs to, before any model loads",
             lambda ws: _edit_pairs(ws, broken="1.png"), ("1.png (control of", "cannot be read")),
    BadInput("control-uneven", "A sample with more (or fewer) control images than the others",
             "Names the sample and its control images, and how many the others have",
             lambda ws: _edit_pairs(ws, references="3"),
             ("3.png has 2 control image(s) (3_0.png, 3_1.png) where 3 other image(s) have 1",)),
    BadInput("control-not-an-edit-family", "`data.control` with a family that takes no control images",
             "Says so and names the edit families, before any model loads",
             lambda ws: _edit_pairs(ws, edit_slots=0),
             ("model.family sd takes no control images", "edit families:", "remove data.control")),
    BadInput("control-too-many", "More control images per sample than the family takes",
             "Says how many the family takes, before any model loads",
             lambda ws: _edit_pairs(ws, folders=2),
             ("every sample has 2 control images", "takes at most 1")),
    BadInput("control-random-crop", "`data.crop: random` with `data.control`",
             "Refuses: a random crop would cut a target and its control image differently; use `data.crop: center`",
             lambda ws: _edit_pairs(ws, crop="random"), ("data.crop: center with data.control",)),
    BadInput("control-class-images", "`prior.mode: class_images` with `data.control`",
             "Refuses: class images have no control images; use `prior.mode: base_prediction` or none",
             lambda ws: _edit_pairs(ws) and ws.train(data={"control": {"folders": [str(ws.tmp / "controls")]}},
                                                     prior={"mode": "class_images", "class_prompt": ["a shape"]}),
             ("prior.mode: base_prediction",)),
    # the strategy meets the model
    BadInput("placeholder-past-the-window", "Textual-inversion captions whose placeholder lies past the text "
             "encoder's window (75 tokens for CLIP)", "Names the images and where the placeholder sits; move it up, "
             "shorten the captions, or set `data.max_token_length: 150`", _placeholder_past_the_window,
             ("past the text encoder's window of 30 tokens", "0.png (at token", "data.max_token_length: 150"),
             loads_model=True),
    BadInput("token-in-vocabulary", "A textual-inversion token that is already a word of the tokenizer",
             "Asks for a string the vocabulary lacks, such as `<a-concept>`",
             lambda ws: ws.train(strategy={**TI, "placeholder_token": "a"}),
             ("already in the tokenizer's vocabulary", "'<a-concept>'"), loads_model=True),
    BadInput("adapter-for-another-base", "Sampling with an adapter made for another base model",
             "Names the mismatched layer and shapes",
             lambda ws: ["sample", "--base", str(ws.base), "--adapter", str(_lora_for_another_base(ws)),
                         "--prompt", "x", "--out", str(ws.out / "grid.png"), "--steps", "1", "--num", "1"],
             ("attn2.to_k", "768", "another base"), loads_model=True),
    BadInput("initial-weights-for-another-base", "Training on from a LoRA made for another base model",
             "Names the layer and says the file was made for another base",
             lambda ws: ws.train(strategy={"kind": "lora", "initial_weights": str(_lora_for_another_base(ws))}),
             ("attn2.to_k", "another base model"), loads_model=True),
    # output and checkpoints
    BadInput("output-dir-is-a-file", "`output_dir` is a file", "Asks for a folder",
             lambda ws: ws.out.write_text("x") and ws.train(), ("output_dir", "is a file; choose a folder")),
    BadInput("output-dir-not-writable", "`output_dir` cannot be written (permissions, read-only disk)",
             "Says so before any model loads", _not_writable, ("not writable", "choose a folder you can write to")),
    BadInput("resume-another-recipe", "`--resume` with a checkpoint made by a different recipe",
             "Names each setting that differs, with both values", _resume_another_recipe,
             ("different recipe", "strategy.rank: 4 in the checkpoint's run, 8 now", "start a new output_dir")),
    BadInput("cache-dir-not-writable", "`cache.dir` (the disk latent cache) cannot be written (permissions, "
             "read-only disk)", "Says so before any model loads; another `cache.dir`, or `cache.latents: memory`",
             lambda ws: ws.train(cache={"latents": "disk", "dir": str(_unwritable(ws))}),
             ("cache.latents: disk keeps its entries in", "cannot be written", "cache.latents: memory")),
    BadInput("finetune-cache-not-writable", "`$FINETUNE_CACHE` cannot be written (permissions, read-only disk)",
             "Says so before any model loads, for each cache that would write there; another `$FINETUNE_CACHE`, or "
             "that cache off", lambda ws: ws.monkeypatch.setenv("FINETUNE_CACHE", str(_unwritable(ws)))
             or ws.train(cache={"latents": "disk"}),
             ("finetune-cache/latents", "cannot be written", "$FINETUNE_CACHE")),
    BadInput("output-dir-holds-a-run", "A new run in an `output_dir` that holds a finished artifact or checkpoints",
             "Refuses before any model loads, changing nothing; offers a new `output_dir`, `--overwrite`, and "
             "`--resume latest` for a run that has not finished", _second_run_in_a_finished_output_dir,
             ("already holds a finished artifact", "output_dir=PATH", "--overwrite")),
    BadInput("resume-a-finished-run", "`--resume latest` where the run finished and no checkpoint is left",
             "Says there is nothing to resume; a new `output_dir`, or `--overwrite` to train again",
             _resume_a_finished_run, ("nothing to resume", "no checkpoint", "--overwrite")),
    BadInput("resume-not-a-checkpoint", "`--resume PATH` that is not a checkpoint folder",
             "Shows what a checkpoint folder looks like, or `latest`",
             lambda ws: ws.train("--resume", str(ws.tmp)), ("not a checkpoint folder", "latest")),
    BadInput("checkpoint-cut-short", "`--resume latest` meets a checkpoint cut short or damaged since it was "
             "written (a copy, a sync client)", "Names the damaged file; offers the newest good checkpoint with the "
             "exact command, which resumes exactly",
             lambda ws: _damaged_checkpoint(ws, lambda folder: _cut_in_half(folder / "trainable.safetensors")),
             ("step-000002", "trainable.safetensors is cut short or damaged", "--resume", "step-000001"),
             then=_resumes_exactly_from_the_good_one),
    BadInput("checkpoint-without-state", "`--resume latest` meets a checkpoint folder without its `state.json`",
             "Names it instead of going back to an older checkpoint in silence; offers the newest good one",
             lambda ws: _damaged_checkpoint(ws, lambda folder: (folder / "state.json").unlink()),
             ("step-000002 is damaged: it has no state.json", "--resume", "step-000001")),
    # files given to the tools
    BadInput("adapter-file-cut-short", "A LoRA, embedding or hypernetwork file cut short (an interrupted download "
             "or copy) given to `sample`, `inspect`, `convert` or `merge`",
             "Names the file before any model loads: download or copy it again",
             lambda ws: ["sample", "--base", str(ws.base), "--adapter", str(_half_lora(ws)), "--prompt", "x",
                         "--out", str(ws.tmp / "grid.png"), "--steps", "1", "--num", "1"],
             ("half.safetensors is cut short or damaged", "download or copy it again")),
    BadInput("initial-weights-cut-short", "`strategy.initial_weights` (a LoRA to train on from) cut short",
             "Names the file before any model loads: download or copy it again",
             lambda ws: ws.train(strategy={"kind": "lora", "initial_weights": str(_half_lora(ws))}),
             ("strategy.initial_weights", "half.safetensors is cut short or damaged", "download or copy it again")),
    # during the run
    BadInput("loss-not-finite", "The loss becomes NaN or infinite (here: `learning_rate: 1e10`)",
             "Stops at once, names the step, keeps the last good checkpoint; prints the commands that go on from it "
             "(a resume accepts a new learning rate) or start again, at a tenth of the learning rate",
             lambda ws: ws.train(train={"learning_rate": 1e10}, checkpoint={"every": 1}),
             ("the loss became nan at step 2", "step-000001", "a tenth of the learning rate",
              "train.learning_rate=1.0e+09", "--resume latest", "--overwrite"),
             loads_model=True, then=_checkpoint_kept_and_resumable),
    BadInput("disk-full-at-checkpoint", "The disk fills up while a checkpoint is written",
             "Removes the half-written files, keeps the last good checkpoint, says how to resume",
             lambda ws: ws.fail_writes(after=1) or ws.train(checkpoint={"every": 1}),
             ("no room left on the disk", "step 2", "step-000001", "--resume latest"),
             loads_model=True, then=_resumes_once_there_is_room),
    BadInput("disk-full-at-final-save", "The disk fills up while the final file is written",
             "Removes the half-written file and says so", lambda ws: ws.fail_writes(after=0) or ws.train(),
             ("no room left on the disk", "the artifact", "Free some space"), loads_model=True),
]


# the generated table sits between these markers in docs/troubleshooting.md
TABLE_START, TABLE_END = "<!-- troubleshooting:start -->", "<!-- troubleshooting:end -->"


def troubleshooting_table() -> str:
    """The Markdown table of every catalogue entry: the problem and what finetune does about it."""
    rows = [f"| {case.problem} | {case.answer} |" for case in CATALOGUE]
    return "\n".join(["| Problem | What finetune does, and the fix |", "| --- | --- |", *rows])


def with_table(page: str) -> str:
    """`page` with the text between the troubleshooting markers replaced by the current table."""
    if TABLE_START not in page or TABLE_END not in page:
        raise ValueError(f"no {TABLE_START} ... {TABLE_END} markers to write the table between")
    before, rest = page.split(TABLE_START, 1)
    return f"{before}{TABLE_START}\n{troubleshooting_table()}\n{TABLE_END}{rest.split(TABLE_END, 1)[1]}"


if __name__ == "__main__":
    import sys

    if len(sys.argv) > 1:  # python -m tests.bad_inputs docs/troubleshooting.md: rewrite the page's table
        page = Path(sys.argv[1])
        page.write_text(with_table(page.read_text(encoding="utf-8")), encoding="utf-8")
        print(f"wrote the troubleshooting table in {page}")
    else:
        print(troubleshooting_table())
