"""The recipe's sections about what is trained on: `data`, `prior` and `cache` (re-exported by
finetune/recipe/schema.py, where the rest of the recipe is declared)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from finetune.recipe.keys import key


@dataclass
class ControlOptions:
    """data.control: the control (reference) images of edit models (Flux.1 Kontext, Qwen-Image-Edit, Flux.2's
    references), each paired with a training image, the target the edit should produce."""

    folders: list[str] = key(
        help="Folders of control images, each one control slot, matched to the training images by their path "
        "relative to `data.images` and file name with any image suffix (`img1.png` <-> `control/img1.jpg`); a "
        "folder holding several references per image numbers them `img1_0.png`, `img1_1.png` (slots in that "
        "order). Exactly one of `folders` and `column`.", factory=list)
    column: Optional[str] = key(
        None, "The `metadata.jsonl` field or dataset column that holds each image's control image (a path, "
        "relative to `data.images` for `metadata.jsonl`, or an image), or a list of them, one per slot "
        "(`control_image` is usual). Exactly one of `folders` and `column`.")
    resolution: Optional[int] = key(
        None, "With `resize: bucket`, the side of the square whose area the control images keep (a multiple of "
        "the VAE's downsampling); null: `data.resolution`.", minimum=8)
    resize: Literal["target", "bucket"] = key(
        "target", "`target`: each control image is brought to its target's training size with the same crop and "
        "flip, for pixel-aligned edits. `bucket`: it keeps its own aspect ratio at `resolution` squared in area, "
        "in its own bucket of the `data.buckets` grid (flipped with its target), as the Kontext and "
        "Qwen-Image-Edit pipelines size references.")


@dataclass
class DataOptions:
    """The training images and their captions: an image folder (`data.images`) or a Hugging Face dataset
    (`data.dataset`), exactly one of them, and how each image is sized, cropped and captioned."""

    images: Optional[str] = key(
        None, "A folder of training images, its subfolders at any depth included, with a caption file beside each "
        "image (`a.png`, `a.txt`) or a `metadata.jsonl` (`file_name`, `text`). kohya's layout works: a subfolder "
        "named `<repeats>_<text>` (`10_sks dog`) repeats its images that many times and captions those without a "
        "caption file with `<text>`.")
    dataset: Optional[str] = key(
        None, "A Hugging Face `datasets` name or a `save_to_disk` folder, instead of `data.images`.")
    split: str = key("train", "The dataset split to train on (with `data.dataset`).")
    image_column: str = key("image", "The dataset column that holds the images.")
    caption_column: str = key("text", "The dataset column (or `metadata.jsonl` field) that holds the captions.")
    prompt: Optional[str] = key(
        None, "One caption for every image (e.g. `a photo of sks dog`), in place of their own; null: each image's "
        "own caption.")
    caption_extension: str = key(".txt", "The file extension of the caption files beside the images.")
    repeats: int = key(1, "How many times each image appears per epoch (times a kohya folder's own repeats).",
                       minimum=1)
    resolution: int = key(
        512, "The side in pixels images train at (with `data.bucketing`, the square whose area buckets keep); a "
        "multiple of the VAE's downsampling, 8 for most families.")
    crop: Literal["center", "random"] = key(
        "center", "How an image is cropped to its size after its shorter side is resized to it. `random` turns "
        "the latent cache off.")
    random_flip: bool = key(False, "Flip each image left to right at random.")
    caption_dropout: float = key(
        0.0, "The probability that an image trains with an empty caption, which helps classifier-free guidance; "
        "0: never.", minimum=0, maximum=1)
    max_token_length: Optional[Literal[75, 150, 225]] = key(
        None, "Encode a caption longer than CLIP's 75 tokens whole, in 75-token chunks each with its own start and "
        "end tokens, as kohya's `--max_token_length` and AUTOMATIC1111's long prompts do (sample grids and "
        "`finetune sample` too); null: cut at 75 tokens, and the run's summary says how many captions are cut.")
    on_bad_image: Literal["error", "skip"] = key(
        "error", "An image that cannot be read: `error` names every such image before training; `skip` warns and "
        "trains without them.")
    on_small_image: Literal["upscale", "skip", "error"] = key(
        "upscale", "An image smaller than the size it trains at: `upscale` enlarges it (softer) and warns, naming "
        "it; `skip` leaves it out; `error` refuses to start.")
    num_workers: int = key(0, "Processes that load and prepare images beside training; 0: the training process "
                           "itself.", minimum=0)
    bucketing: bool = key(
        False, "Aspect-ratio buckets: each image trains at the bucket size nearest its shape, each batch from one "
        "bucket; the buckets used are reported in `output_dir/buckets.json`.")
    buckets: list[list[int]] = key(
        help="The buckets as `[[width, height], ...]`, each side a multiple of 8; empty: every `bucket_step` from "
        "`bucket_min_side` to `bucket_max_side` whose area is within `resolution` squared.", factory=list)
    bucket_step: Optional[int] = key(
        None, "The step between derived bucket sides, a multiple of 8; null: following the resolution (64 at 512 "
        "px, as kohya's).")
    bucket_min_side: Optional[int] = key(
        None, "The shortest side of a derived bucket; null: following the resolution (256 at 512 px).")
    bucket_max_side: Optional[int] = key(
        None, "The longest side of a derived bucket; null: following the resolution (1024 at 512 px).")
    bucket_max_crop: float = key(
        0.5, "Skip (and report) an image that fitting its bucket would crop by more than this share of its area.",
        minimum=0, below=1)
    masks: Optional[str] = key(
        None, "Masked loss: `alpha` takes each image's alpha channel; a folder holds one grayscale mask per image, "
        "named like the image (white: trained, black: not). null: every pixel trains.")
    unmasked_weight: float = key(
        0.0, "The loss weight of black mask pixels: 0, they do not train; 1, they train fully.", minimum=0,
        maximum=1, hint="0: black pixels do not train, 1: they train fully")
    control: Optional[ControlOptions] = key(
        None, "Edit models' control images, paired with the training images: `{folders: [control]}` or "
        "`{column: control_image}`, with `resize` and `resolution`; needs an edit family (`model.family`). "
        "null: none.")


@dataclass
class PriorOptions:
    """Prior preservation against overfitting and language drift (DreamBooth, Ruiz et al. 2023), for any strategy:
    while it learns the instance, the model keeps drawing its class (`a photo of a dog`) as the base does."""

    mode: Literal["none", "class_images", "base_prediction"] = key(
        "none", "`class_images`: the frozen base draws `num_class_images` images of `class_prompt` once, and every "
        "batch holds as many of them as instance images; loss = instance loss + `loss_weight` x class loss. "
        "`base_prediction`: no images; class prompts on noised instance latents are regressed onto the frozen "
        "base's own prediction for them.")
    class_prompt: list[str] = key(
        help="The class the instances belong to (`a photo of a dog`), or a list of prompts the class images cycle "
        "through; needed by every mode but `none`.", factory=list)
    loss_weight: float = key(1.0, "The class loss's weight: loss = instance loss + loss_weight x class loss.",
                             minimum=0, hint="1.0 is usual")
    num_class_images: int = key(100, "How many class images the base draws (`class_images`).", minimum=1)
    class_data_dir: Optional[str] = key(
        None, "Where drawn class images are kept, a subfolder per base, prompts, resolution, seed and sampler, so "
        "only missing ones are drawn; null: `~/.cache/finetune/class_images` (`$FINETUNE_CACHE` moves it).")
    steps: int = key(25, "Sampler steps for each class image.", minimum=1)
    guidance_scale: float = key(7.5, "Classifier-free guidance scale for the class images.", minimum=0)
    negative_prompt: str = key("", "The negative prompt for the class images.")
    seed: int = key(0, "The seed the class images are drawn with.")
    generation_batch_size: int = key(4, "How many class images are drawn at once.", minimum=1)


@dataclass
class CacheOptions:
    """Work done once instead of every step: the VAE's latents of the images and the text encoder's output for
    the captions. A cached run trains exactly as an uncached one."""

    # each step still draws its own latent sample from the cached distribution (finetune/data/caches.py)
    latents: Literal["auto", "memory", "disk", "off"] = key(
        "auto", "Cache the VAE's latent distribution of every training and class image, per size and flip. "
        "`auto`: in memory, or on disk above 2 GB; off, with a message, where a cache cannot be right (random "
        "crops).")
    text: Literal["auto", "on", "off"] = key(
        "auto", "Cache the text encoder's output for every caption. `auto`: on unless the strategy trains the text "
        "encoder or changes the captions.")
    dir: Optional[str] = key(
        None, "Where disk latents are kept; null: `~/.cache/finetune/latents` (`$FINETUNE_CACHE` moves it).")
    offload: bool = key(True, "Once both caches are built, move the VAE and the text encoders off the accelerator.")
    text_encoders: Literal["together", "one_at_a_time"] = key(
        "together", "While the caches fill, the text encoders sit on the accelerator `together`, or come "
        "`one_at_a_time`, each only while it encodes: the memory of the largest, not of all of them (for a family "
        "with several large encoders, HiDream's four).")
