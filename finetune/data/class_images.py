"""Class images for prior preservation: drawn once by the frozen base, cached, reused by every later run.

The cache folder is keyed by everything that decides what the images look like (base model, prompts,
resolution, seed, sampler settings), so a changed recipe never reuses images made for another. Image i is a
function of (seed, i) alone, through its own generator, so a run that asks for more images, or one that was
interrupted, only draws the missing ones and gets exactly the images an uninterrupted run would have drawn.
Each image is written to a temporary name and renamed, caption first, so a present PNG is always complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from finetune.console import progress_bar
from finetune.data.images import open_image
from finetune.data.sources import Example
from finetune.io.atomic import atomic_file
from finetune.paths import cache_home


@dataclass(frozen=True)
class ClassImageSpec:
    base_model: str
    prompts: tuple[str, ...]
    resolution: int
    seed: int
    steps: int
    guidance_scale: float
    negative_prompt: str

    def key(self) -> str:
        text = json.dumps(self.__dict__, sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def folder_name(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.prompts[0].lower()).strip("-")[:40] or "class"
        return f"{slug}-{self.key()}"

    def prompt_for(self, index: int) -> str:
        return self.prompts[index % len(self.prompts)]


def default_cache_root() -> Path:
    return cache_home() / "class_images"


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt")


def base_identity(base: str, revision: str | None, variant: str | None) -> str:
    """The base as the cache key sees it: absolute for local paths, so two spellings of one folder agree, plus
    a digest of the local weights, so a base retrained in place never reuses the old base's drawings."""
    path = Path(os.path.expanduser(base))
    name = str(path.resolve()) if path.exists() else base
    digest = weights_digest(path) if path.exists() else None
    return "@".join(part for part in (name, revision, variant, digest) if part)


def weights_digest(path: Path, samples: int = 16, chunk: int = 1 << 16) -> str:
    """A cheap content fingerprint of a model's weight files: their sizes and `samples` evenly spaced chunks
    of each (a few MB read even for a 4 GB checkpoint; any retraining changes them)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in WEIGHT_SUFFIXES)
    h = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        h.update(f"{file.relative_to(path) if file != path else file.name}:{size}".encode())
        with open(file, "rb") as handle:
            for i in range(samples):
                handle.seek(max(0, size - chunk) * i // max(1, samples - 1))
                h.update(handle.read(chunk))
    return h.hexdigest()[:16]


def class_folder(spec: ClassImageSpec, cache_root: str | None) -> Path:
    root = Path(os.path.expanduser(cache_root)) if cache_root else default_cache_root()
    return root / spec.folder_name()


def image_path(folder: Path, index: int) -> Path:
    return folder / f"{index:05d}.png"


def missing_indices(folder: Path, count: int) -> list[int]:
    return [i for i in range(count) if not image_path(folder, i).is_file()]


def ensure_class_images(spec: ClassImageSpec, count: int, folder: Path, make_pipeline: Callable[[], Any],
                        batch_size: int, show_progress: bool = True) -> int:
    """Draw the images of `folder` that are missing (of the first `count`); return how many were drawn.

    `make_pipeline` is only called when something is missing, so a fully cached run never builds a pipeline.
    """
    folder.mkdir(parents=True, exist_ok=True)
    missing = missing_indices(folder, count)
    if missing:
        _write_spec(folder, spec)
        pipeline = make_pipeline()
        pipeline.set_progress_bar_config(disable=True)
        with progress_bar(total=len(missing), desc="class images", unit="img", disable=not show_progress,
                          dynamic_ncols=True) as progress:
            for start in range(0, len(missing), batch_size):
                chunk = missing[start:start + batch_size]
                images = _draw(pipeline, spec, chunk)
                for index, image in zip(chunk, images):
                    _write_image(folder, index, image, spec.prompt_for(index))
                progress.update(len(chunk))
    return len(missing)


def class_examples(spec: ClassImageSpec, count: int, folder: Path) -> list[Example]:
    """The first `count` cached images with the prompts they were drawn from."""
    return [Example(str(image_path(folder, i)), _caption(folder, i, spec),
                    lambda p=str(image_path(folder, i)): open_image(p)) for i in range(count)]


@torch.no_grad()
def _draw(pipeline: Any, spec: ClassImageSpec, indices: list[int]) -> list:
    # one generator per image: image i depends on (seed, i) only, never on which batch it was drawn in
    generators = [torch.Generator().manual_seed(spec.seed * 1_000_003 + i) for i in indices]
    from finetune.models.base import guidance_keyword
    from finetune.training.sampling import size_arguments, text_arguments

    # true_cfg_scale guides only where a negative prompt is given (Qwen-Image): the empty one, as grids do
    keyword = guidance_keyword(pipeline)
    negative = spec.negative_prompt if spec.negative_prompt or keyword == "true_cfg_scale" else None
    text = {"prompt": [spec.prompt_for(i) for i in indices],
            "negative_prompt": [negative] * len(indices) if negative is not None else None}
    return pipeline(**text_arguments(pipeline, text), num_inference_steps=spec.steps, **{keyword: spec.guidance_scale},
                    height=spec.resolution, width=spec.resolution,
                    **size_arguments(pipeline, spec.resolution, spec.resolution), generator=generators).images


def _write_image(folder: Path, index: int, image, prompt: str) -> None:
    target = image_path(folder, index)
    caption = target.with_suffix(".txt")
    # the caption first: an image counts as drawn once its file is there (missing_indices), its caption with it.
    # Not synced: the cache can be drawn again
    with atomic_file(caption, durable=False) as tmp:
        tmp.write_text(prompt + "\n", encoding="utf-8")
    with atomic_file(target, durable=False) as tmp:
        image.save(tmp, format="PNG")


def _caption(folder: Path, index: int, spec: ClassImageSpec) -> str:
    sidecar = image_path(folder, index).with_suffix(".txt")
    return sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else spec.prompt_for(index)


def _write_spec(folder: Path, spec: ClassImageSpec) -> None:
    """What drew these images, for a person looking into the cache."""
    with atomic_file(folder / "class_images.json", durable=False) as tmp:
        tmp.write_text(json.dumps({**spec.__dict__, "prompts": list(spec.prompts)}, indent=2) + "\n",
                       encoding="utf-8")
