"""Sample grids during training: one row per prompt, each with its own settings and seed, so that grids from
different steps compare."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from PIL import Image

from finetune.io.atomic import atomic_file
from finetune.training.control_images import load_control_images, with_controls
from finetune.training.sample_prompts import SamplePrompt

# a family's sample_kwargs: (control images, width, height, pipeline=) -> the pipeline's keyword arguments
Control = Callable[[list[Image.Image], int, int], dict[str, Any]]


def image_grid(images: list[Image.Image], columns: int) -> Image.Image:
    """`images` in rows of `columns`, every cell the size of the first image."""
    width, height = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def rows_grid(rows: list[list[Optional[Image.Image]]]) -> Image.Image:
    """One row of images per prompt, prompts of different sizes together: every column as wide as the widest
    image, every row as tall as its own tallest; a smaller image sits centred in its cell on white, a None cell
    stays white. Images of one size give image_grid's layout exactly."""
    cell = max(image.width for row in rows for image in row if image is not None)
    heights = [max(image.height for image in row if image is not None) for row in rows]
    grid = Image.new("RGB", (cell * max(len(row) for row in rows), sum(heights)), "white")
    top = 0
    for row, height in zip(rows, heights):
        for column, image in enumerate(row):
            if image is not None:
                grid.paste(image, (column * cell + (cell - image.width) // 2, top + (height - image.height) // 2))
        top += height
    return grid


@torch.no_grad()
def sample_grid(pipeline, prompts: list[str], *, negative_prompt: str, steps: int, guidance_scale: float,
                seed: int, images_per_prompt: int, resolution: int,
                encode: Callable[[list[str]], torch.Tensor] | None = None,
                control: Optional[Control] = None) -> Image.Image:
    """One row per prompt, all drawn with the same settings (prompt i from seed + i), square at `resolution`:
    draw_grid with those settings (`control`: the family's sample_kwargs, as `finetune sample` gives it)."""
    rows = [SamplePrompt(prompt, negative_prompt, seed + index, steps, guidance_scale, resolution, resolution)
            for index, prompt in enumerate(prompts)]
    return draw_grid(pipeline, rows, images_per_prompt, encode, control)


@torch.no_grad()
def draw_grid(pipeline, rows: list[SamplePrompt], images_per_prompt: int,
              encode: Callable[[list[str]], torch.Tensor] | None = None, control: Optional[Control] = None
              ) -> Image.Image:
    """One grid row per prompt, each drawn with its own settings: draw_rows' images in rows_grid's layout, each
    row's control images (if any) before its results."""
    drawn = draw_rows(pipeline, rows, images_per_prompt, encode, control)
    return rows_grid(with_controls(drawn, [row.control_images for row in rows]))


@torch.no_grad()
def draw_rows(pipeline, rows: list[SamplePrompt], images_per_prompt: int,
              encode: Callable[[list[str]], torch.Tensor] | None = None, control: Optional[Control] = None
              ) -> list[list[Image.Image]]:
    """`images_per_prompt` images per prompt, each prompt drawn with its own settings (training/sample_prompts.py):
    its negative prompt, steps, guidance, size, control images, and a CPU generator seeded with its seed. `encode`
    (the family's encode_prompts): prompts are encoded as training encodes them (long prompts in chunks,
    data.max_token_length) and handed to the pipeline as embeddings; without it the pipeline encodes them itself
    (cut at the window). `control` (the family's sample_kwargs): what the pipeline is given for a row's control
    images and size; ValueError for a row with control images and no `control`."""
    from finetune.models.base import guidance_keyword

    pipeline.set_progress_bar_config(disable=True)
    # true_cfg_scale guides only where a negative prompt is given (Qwen-Image): the empty one, as SD's default
    keyword = guidance_keyword(pipeline)
    drawn = []
    for row in rows:
        negative = row.negative_prompt if keyword == "true_cfg_scale" else row.negative_prompt or None
        generator = torch.Generator().manual_seed(row.seed)
        text = ({"prompt_embeds": encode([row.prompt]), "negative_prompt_embeds": encode([row.negative_prompt or ""])}
                if encode is not None else {"prompt": row.prompt, "negative_prompt": negative})
        if row.control_images and control is None:
            raise ValueError("a sample prompt has control images, but no family says how its pipeline takes them")
        given = {**size_arguments(pipeline, row.width, row.height),
                 **(control(load_control_images(row.control_images), row.width, row.height, pipeline=pipeline)
                    if control else {})}
        result = pipeline(**text_arguments(pipeline, text), num_inference_steps=row.steps,
                          **{keyword: row.guidance}, num_images_per_prompt=images_per_prompt,
                          height=row.height, width=row.width, **given, generator=generator)
        drawn.append(list(result.images))
    return drawn


def text_arguments(pipeline, text: dict) -> dict:
    """`text` without a `negative_prompt` the pipeline's __call__ does not take (Flux.2's: embedded guidance, or
    CFG against the empty prompt); a non-empty one is then left out with a warning naming the pipeline. A None
    negative prompt is left out too: the pipeline's own default applies (None, or Sana's "", where None fails)."""
    import inspect
    import logging

    if text.get("negative_prompt", "") is None:
        text = {key: value for key, value in text.items() if key != "negative_prompt"}

    if "negative_prompt" in text and "negative_prompt" not in inspect.signature(pipeline.__call__).parameters:
        if text["negative_prompt"]:
            logging.getLogger(__name__).warning("%s takes no negative prompt: negative_prompt is not used",
                                                type(pipeline).__name__)
        text = {key: value for key, value in text.items() if key != "negative_prompt"}
    return text


def size_arguments(pipeline, width: int, height: int) -> dict:
    """What makes the pipeline draw at width x height, as trained, where its __call__ would draw another size:
    `use_resolution_binning=False` where it takes that (Sana, PixArt: else the nearest size of the base's
    aspect-ratio table), `max_area=width x height` where it takes that (Flux.1 Kontext's pipeline rescales any size
    to max_area, 1024^2 by default)."""
    import inspect

    taken = inspect.signature(pipeline.__call__).parameters
    return {**({"use_resolution_binning": False} if "use_resolution_binning" in taken else {}),
            **({"max_area": width * height} if "max_area" in taken else {})}


@contextmanager
def plain_forward(modules: Iterable[torch.nn.Module]):
    """Within the context, each module that accelerate prepared for mixed precision runs its own forward, without
    the wrapper `prepare` put around it (autocast, and outputs cast to fp32: a pipeline would pass those fp32
    outputs to a VAE in bf16, "Input type (float) and bias type (c10::BFloat16)"); the wrapper is back on leaving.
    A user's pipeline has no such wrapper. accelerate keeps the plain forward in `_original_forward` (what its
    `unwrap_model(keep_fp32_wrapper=False)` restores, for good)."""
    wrapped = [(m, m.__dict__["forward"]) for m in modules
               if "_original_forward" in m.__dict__ and "forward" in m.__dict__]
    for module, _ in wrapped:
        module.forward = module.__dict__["_original_forward"]
    try:
        yield
    finally:
        for module, forward in wrapped:
            module.forward = forward


def save_png(image: Image.Image, path: Path) -> Path:
    """`image` as a PNG at `path`, atomically; a full or read-only disk raises finetune.file_errors.FileProblem
    naming `path`."""
    from finetune.file_errors import writing

    # a sample is no artifact: not synced, as before
    with writing(path, "the image"), atomic_file(path, durable=False) as tmp:
        image.save(tmp, format="PNG")
    return path
