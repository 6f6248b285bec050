"""Tests for the data pipeline in finetune/data: sources, image decoding/transforms, batch order, dataset.

All images are generated with PIL under tmp_path; nothing touches the network or a GPU.
"""
from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.data import (BatchOrder, DataError, Example, ImageCaptionDataset, collate, list_examples,
                           make_loader)
from finetune.data.images import open_image, to_rgb, transform

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


# --------------------------------------------------------------------------------------------- helpers

def save_image(path: Path, size=(16, 12), color=RED, mode="RGB") -> Path:
    Image.new(mode, size, color).save(path)
    return path


def noise_png(path: Path, size=(64, 64), seed=0) -> Path:
    array = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(array, mode="RGB").save(path)
    return path


def examples_from(images=None, dataset=None, *, prompt=None, caption_extension=".txt", split="train",
                  image_column="image", caption_column="text", on_bad_image="error"):
    return list_examples(str(images) if images is not None else None,
                         str(dataset) if dataset is not None else None,
                         prompt=prompt, caption_extension=caption_extension, split=split,
                         image_column=image_column, caption_column=caption_column, on_bad_image=on_bad_image)


def take(order: BatchOrder, n: int) -> list:
    return list(itertools.islice(iter(order), n))


def as_uint8(tensor: torch.Tensor) -> np.ndarray:
    """CHW [-1, 1] tensor back to HWC uint8 for readable pixel assertions."""
    return np.rint((tensor.permute(1, 2, 0).numpy() + 1.0) * 127.5).astype(np.int64)


# --------------------------------------------------------------------------- 1. folder with sidecars

def test_folder_sidecar_captions_are_read_and_stripped(tmp_path):
    save_image(tmp_path / "b.png", size=(20, 10), color=BLUE)
    save_image(tmp_path / "a.jpg", size=(8, 8), color=RED)
    (tmp_path / "a.txt").write_text("  a photo of a cat \n\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("\ta blue square\n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("not an image")  # ignored: not an image suffix

    examples = examples_from(tmp_path)

    assert [Path(e.name).name for e in examples] == ["a.jpg", "b.png"]
    assert [e.caption for e in examples] == ["a photo of a cat", "a blue square"]
    loaded = examples[1].load()
    assert loaded.mode == "RGB" and loaded.size == (20, 10)
    assert loaded.getpixel((5, 5)) == BLUE


def test_folder_missing_sidecar_names_file_and_suggests_prompt(tmp_path):
    save_image(tmp_path / "has_caption.png")
    (tmp_path / "has_caption.txt").write_text("captioned", encoding="utf-8")
    save_image(tmp_path / "lonely.png")

    with pytest.raises(DataError) as info:
        examples_from(tmp_path)
    message = str(info.value)
    assert "lonely.png" in message
    assert "has_caption.png" not in message
    assert "data.prompt" in message
    assert ".txt" in message


def test_folder_prompt_gives_every_image_the_caption_without_sidecars(tmp_path):
    for name in ("x.png", "y.png", "z.jpg"):
        save_image(tmp_path / name)
    (tmp_path / "x.txt").write_text("this sidecar is ignored", encoding="utf-8")

    examples = examples_from(tmp_path, prompt="a sks dog")

    assert len(examples) == 3
    assert all(e.caption == "a sks dog" for e in examples)


def test_folder_non_utf8_caption_names_the_file(tmp_path):
    save_image(tmp_path / "cafe.png")
    (tmp_path / "cafe.txt").write_bytes("un caf\u00e9".encode("latin-1"))

    with pytest.raises(DataError) as info:
        examples_from(tmp_path)
    assert str(tmp_path / "cafe.txt") in str(info.value)
    assert "UTF-8" in str(info.value)


def test_folder_without_images_is_an_error(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(DataError, match="no images"):
        examples_from(tmp_path)


# ----------------------------------------------------------------------------------- 2. metadata.jsonl

def write_metadata(folder: Path, lines: list[str]) -> None:
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_metadata_jsonl_is_read_with_caption_column(tmp_path):
    save_image(tmp_path / "one.png", color=RED)
    (tmp_path / "sub").mkdir()
    save_image(tmp_path / "sub" / "two.png", color=GREEN)
    write_metadata(tmp_path, [
        json.dumps({"file_name": "one.png", "text": " first ", "caption": "alt one"}),
        "",  # blank lines are allowed
        json.dumps({"file_name": "sub/two.png", "text": "second", "caption": "alt two"}),
    ])

    examples = examples_from(tmp_path, caption_column="text")
    assert [e.caption for e in examples] == ["first", "second"]
    assert [Path(e.name).name for e in examples] == ["one.png", "two.png"]
    assert examples[1].load().getpixel((0, 0)) == GREEN

    # the caption column really is the argument, not a hard-coded "text"
    assert [e.caption for e in examples_from(tmp_path, caption_column="caption")] == ["alt one", "alt two"]
    # and no .txt sidecars were needed
    assert not list(tmp_path.glob("*.txt"))


def test_metadata_bad_json_names_line_number(tmp_path):
    save_image(tmp_path / "one.png")
    save_image(tmp_path / "two.png")
    write_metadata(tmp_path, [
        json.dumps({"file_name": "one.png", "text": "ok"}),
        json.dumps({"file_name": "two.png", "text": "ok"}),
        '{"file_name": "three.png", "text": ',  # line 3: broken
    ])
    with pytest.raises(DataError) as info:
        examples_from(tmp_path)
    assert "line 3" in str(info.value)
    assert "metadata.jsonl" in str(info.value)


def test_metadata_missing_listed_file_is_named(tmp_path):
    save_image(tmp_path / "present.png")
    write_metadata(tmp_path, [
        json.dumps({"file_name": "present.png", "text": "here"}),
        json.dumps({"file_name": "ghost.png", "text": "gone"}),
    ])
    with pytest.raises(DataError) as info:
        examples_from(tmp_path)
    assert "ghost.png" in str(info.value)
    assert "line 2" in str(info.value)


def test_metadata_missing_caption_field_is_reported(tmp_path):
    save_image(tmp_path / "one.png")
    write_metadata(tmp_path, [json.dumps({"file_name": "one.png", "text": "x"})])
    with pytest.raises(DataError, match="'caption'"):
        examples_from(tmp_path, caption_column="caption")
    # ...unless a prompt supplies the caption
    assert [e.caption for e in examples_from(tmp_path, caption_column="caption", prompt="p")] == ["p"]


# ------------------------------------------------------------------------- 3. datasets save_to_disk

@pytest.fixture(scope="module")
def saved_dataset(tmp_path_factory):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path_factory.mktemp("hfds") / "ds"
    images = [Image.new("RGB", (12, 10), RED), Image.new("RGB", (10, 12), BLUE), Image.new("L", (8, 8), 128)]
    ds = datasets.Dataset.from_dict({"picture": images, "words": [" red one ", "blue one", "gray one"]})
    ds = ds.cast_column("picture", datasets.Image())
    ds.save_to_disk(str(folder))
    return folder


def test_dataset_from_disk_with_columns(saved_dataset):
    examples = examples_from(dataset=saved_dataset, image_column="picture", caption_column="words")

    assert [e.caption for e in examples] == ["red one", "blue one", "gray one"]
    assert examples[0].name == f"{saved_dataset}[0]"
    first, second, third = (e.load() for e in examples)
    assert first.mode == second.mode == third.mode == "RGB"
    assert first.size == (12, 10) and first.getpixel((0, 0)) == RED
    assert second.size == (10, 12) and second.getpixel((0, 0)) == BLUE
    assert third.getpixel((0, 0)) == (128, 128, 128)


def test_dataset_prompt_overrides_captions(saved_dataset):
    examples = examples_from(dataset=saved_dataset, image_column="picture", caption_column="nope",
                             prompt="a sks dog")
    assert [e.caption for e in examples] == ["a sks dog"] * 3


@pytest.mark.parametrize("image_column, caption_column, key, bad", [
    ("image", "words", "image_column", "image"),
    ("picture", "text", "caption_column", "text"),
])
def test_dataset_wrong_column_lists_columns(saved_dataset, image_column, caption_column, key, bad):
    with pytest.raises(DataError) as info:
        examples_from(dataset=saved_dataset, image_column=image_column, caption_column=caption_column)
    message = str(info.value)
    assert f"data.{key}" in message
    assert repr(bad) in message
    assert "picture" in message and "words" in message


def test_dataset_dict_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"image": [Image.new("RGB", (4, 4), GREEN)], "text": ["g"]})
    ds = ds.cast_column("image", datasets.Image())
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))

    assert [e.caption for e in examples_from(dataset=tmp_path / "dd", split="train")] == ["g"]
    with pytest.raises(DataError, match="'validation'.*train"):
        examples_from(dataset=tmp_path / "dd", split="validation")


# ------------------------------------------------------------------------------- 4. unreadable images

@pytest.fixture
def folder_with_bad_images(tmp_path):
    save_image(tmp_path / "good1.png", color=RED)
    save_image(tmp_path / "good2.jpg", color=GREEN)
    full = noise_png(tmp_path / "scratch.png").read_bytes()
    (tmp_path / "scratch.png").unlink()
    (tmp_path / "truncated.png").write_bytes(full[: len(full) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("this is not a PNG at all\n")
    return tmp_path


BAD_NAMES = ("truncated.png", "empty.png", "text.png")


def test_bad_images_error_names_each_file(folder_with_bad_images):
    with pytest.raises(DataError) as info:
        examples_from(folder_with_bad_images, prompt="p", on_bad_image="error")
    message = str(info.value)
    for name in BAD_NAMES:
        assert name in message
    assert "good1.png" not in message and "good2.jpg" not in message
    assert "3 unreadable" in message
    assert "data.on_bad_image: skip" in message


def test_bad_images_skip_keeps_good_ones(folder_with_bad_images):
    examples = examples_from(folder_with_bad_images, prompt="p", on_bad_image="skip")
    assert sorted(Path(e.name).name for e in examples) == ["good1.png", "good2.jpg"]
    assert all(e.load().mode == "RGB" for e in examples)


def test_truncated_png_fails_in_open_image(folder_with_bad_images):
    # the premise of the tests above: open_image decodes fully, so truncation is caught up front
    with pytest.raises(OSError):
        open_image(str(folder_with_bad_images / "truncated.png"))


def test_skip_with_nothing_readable_is_an_error(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match="no readable images"):
        examples_from(tmp_path, prompt="p", on_bad_image="skip")


# -------------------------------------------------------------------------------- 5. to_rgb / open_image

def test_grayscale_to_rgb():
    out = to_rgb(Image.new("L", (5, 3), 100))
    assert out.mode == "RGB" and out.size == (5, 3)
    assert out.getpixel((2, 1)) == (100, 100, 100)


def test_rgba_transparency_goes_on_white():
    image = Image.new("RGBA", (3, 1), (0, 0, 0, 0))
    image.putpixel((1, 0), (255, 0, 0, 255))
    image.putpixel((2, 0), (0, 0, 0, 128))
    out = to_rgb(image)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == WHITE  # fully transparent black -> white, not black
    assert out.getpixel((1, 0)) == RED
    assert all(abs(c - 127) <= 1 for c in out.getpixel((2, 0)))  # half-transparent black -> mid gray


def test_la_transparency_goes_on_white():
    out = to_rgb(Image.new("LA", (2, 2), (0, 0)))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == WHITE


def test_palette_to_rgb(tmp_path):
    image = Image.new("P", (4, 2), 0)
    image.putpalette([*RED, *BLUE] + [0, 0, 0] * 254)
    image.putpixel((3, 1), 1)
    out = to_rgb(image)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == RED and out.getpixel((3, 1)) == BLUE

    # palette transparency (as a PNG stores it) is also flattened on white
    image.save(tmp_path / "p.png", transparency=0)
    reopened = open_image(str(tmp_path / "p.png"))
    assert reopened.mode == "RGB"
    assert reopened.getpixel((0, 0)) == WHITE and reopened.getpixel((3, 1)) == BLUE


def test_16_bit_to_rgb(tmp_path):
    array = np.zeros((2, 3), dtype=np.uint16)
    array[:, 1] = 32768
    array[:, 2] = 65535
    image = Image.fromarray(array)
    assert image.mode == "I;16"
    image.save(tmp_path / "deep.png")

    for out in (to_rgb(image), open_image(str(tmp_path / "deep.png"))):
        assert out.mode == "RGB" and out.size == (3, 2)
        assert out.getpixel((0, 0)) == (0, 0, 0)
        assert all(127 <= c <= 128 for c in out.getpixel((1, 0)))
        assert out.getpixel((2, 1)) == WHITE  # not clipped to white everywhere, not left as 1/256 dark


def test_exif_rotated_jpeg_is_upright(tmp_path):
    image = Image.new("RGB", (40, 20), RED)
    image.paste(BLUE, (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)

    out = open_image(str(tmp_path / "rotated.jpg"))
    assert out.mode == "RGB"
    assert out.size == (20, 40)  # width and height swapped
    top, bottom = out.getpixel((10, 5)), out.getpixel((10, 35))
    # rotating 90 degrees clockwise brings the left (red) half to the top
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


# -------------------------------------------------------------------------------------------- 6. transform

def test_transform_shape_dtype_and_range():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (37, 50, 3), dtype=np.uint8))
    out = transform(image, (32, 32), "center", True, random.Random(0))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    assert out.min() < -0.5 and out.max() > 0.5  # uses the range, not squashed

    # exact endpoints: black -> -1, white -> +1, channels first
    assert torch.equal(transform(Image.new("RGB", (32, 32), (0, 0, 0)), (32, 32), "center", False, random.Random(0)),
                       torch.full((3, 32, 32), -1.0))
    red = transform(Image.new("RGB", (32, 32), RED), (32, 32), "center", False, random.Random(0))
    assert torch.all(red[0] == 1.0) and torch.all(red[1] == -1.0) and torch.all(red[2] == -1.0)


def test_center_crop_of_wide_image_takes_the_middle():
    image = Image.new("RGB", (96, 32), RED)
    image.paste(GREEN, (32, 0, 64, 32))  # green middle third
    out = as_uint8(transform(image, (32, 32), "center", False, random.Random(0)))
    assert (out == np.array(GREEN)).all()

    # also through a downscale: 192x64 -> 96x32 -> middle 32 columns
    big = Image.new("RGB", (192, 64), RED)
    big.paste(GREEN, (64, 0, 128, 64))
    out = as_uint8(transform(big, (32, 32), "center", False, random.Random(0)))
    assert (np.abs(out[:, 2:30] - np.array(GREEN)) <= 8).all()


def test_center_crop_of_tall_image_takes_the_middle():
    image = Image.new("RGB", (32, 96), RED)
    image.paste(BLUE, (0, 32, 32, 64))
    out = as_uint8(transform(image, (32, 32), "center", False, random.Random(0)))
    assert (out == np.array(BLUE)).all()


def test_random_crop_stays_in_bounds_and_is_seeded():
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 80, 3), dtype=np.uint8))
    outs = [transform(image, (32, 32), "random", False, random.Random(seed)) for seed in range(10)]
    assert all(o.shape == (3, 32, 32) for o in outs)
    assert torch.equal(outs[3], transform(image, (32, 32), "random", False, random.Random(3)))
    assert len({o.numpy().tobytes() for o in outs}) > 1


@pytest.mark.parametrize("size", [(10, 8), (8, 20), (31, 31)])
def test_small_image_is_upscaled_to_resolution(size):
    out = transform(Image.new("RGB", size, BLUE), (32, 32), "center", False, random.Random(0))
    assert out.shape == (3, 32, 32)
    assert (np.abs(as_uint8(out) - np.array(BLUE)) <= 1).all()


def test_random_flip_is_seeded():
    image = Image.new("RGB", (32, 32), RED)
    image.paste(BLUE, (16, 0, 32, 32))  # left red, right blue

    def flipped(seed: int, flip: bool = True) -> bool:
        dataset = ImageCaptionDataset([Example("x", "x", lambda: image)], [(32, 32)], "center", flip, 0.0)
        out = as_uint8(dataset[(0, seed)]["pixel_values"])
        left = tuple(out[16, 0])
        assert left in (RED, BLUE)
        return left == BLUE

    results = {seed: flipped(seed) for seed in range(40)}
    assert any(results.values()) and not all(results.values())  # flips for some seeds, not others
    assert all(flipped(seed) == results[seed] for seed in range(40))  # deterministic per seed
    assert not any(flipped(seed, flip=False) for seed in range(40))  # random_flip off: never


# ------------------------------------------------------------------------------------------ 7. BatchOrder

def test_batch_order_deterministic_for_a_seed():
    a = take(BatchOrder(10, 1, 2, 1, 0, seed=7), 12)
    b = take(BatchOrder(10, 1, 2, 1, 0, seed=7), 12)
    assert a == b
    assert all(len(batch) == 2 for batch in a)
    assert all(0 <= index < 10 for batch in a for index, _ in batch)


def test_batch_order_seeds_differ():
    a = take(BatchOrder(20, 1, 4, 1, 0, seed=1), 5)
    b = take(BatchOrder(20, 1, 4, 1, 0, seed=2), 5)
    assert [[i for i, _ in batch] for batch in a] != [[i for i, _ in batch] for batch in b]


def test_batch_order_epoch_is_a_permutation():
    batches = take(BatchOrder(12, 1, 3, 1, 0, seed=0), 4)  # exactly one epoch
    assert sorted(i for batch in batches for i, _ in batch) == list(range(12))


def test_batch_order_reshuffles_each_epoch():
    order = BatchOrder(12, 1, 12, 1, 0, seed=0)  # one micro-batch = one whole epoch
    epochs = [[i for i, _ in batch] for batch in take(order, 3)]
    assert all(sorted(e) == list(range(12)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3


def test_batch_order_ranks_split_the_global_batch():
    n, bs, steps = 13, 3, 10  # 13 // 6 = 2 micro-batches per epoch; 1 example dropped each epoch
    rank0 = take(BatchOrder(n, 1, bs, 2, 0, seed=5), steps)
    rank1 = take(BatchOrder(n, 1, bs, 2, 1, seed=5), steps)
    single = take(BatchOrder(n, 1, 2 * bs, 1, 0, seed=5), steps)  # the same global batches on one process
    for r0, r1, whole in zip(rank0, rank1, single):
        assert len(r0) == len(r1) == bs
        assert not set(r0) & set(r1)
        assert not {i for i, _ in r0} & {i for i, _ in r1}
        assert set(r0) | set(r1) == set(whole)
    assert rank0 != rank1


@pytest.mark.parametrize("world_size, rank", [(1, 0), (2, 1)])
def test_batch_order_resume_yields_the_tail(world_size, rank):
    n, bs = 10, 2  # batches per epoch: 5 (world 1) or 2 (world 2)
    full = take(BatchOrder(n, 1, bs, world_size, rank, seed=3), 14)
    per_epoch = BatchOrder(n, 1, bs, world_size, rank, seed=3).batches_per_epoch
    assert len(full) > 2 * per_epoch  # the comparison spans epoch boundaries
    for k in range(len(full)):
        resumed = take(BatchOrder(n, 1, bs, world_size, rank, seed=3, start=k), len(full) - k)
        assert resumed == full[k:], f"start={k}"


def test_batch_order_repeats_multiply_epoch_length():
    once = BatchOrder(4, 1, 2, 1, 0, seed=0)
    thrice = BatchOrder(4, 3, 2, 1, 0, seed=0)
    assert once.batches_per_epoch == 2
    assert thrice.batches_per_epoch == 6
    epoch = take(thrice, 6)
    assert Counter(i for batch in epoch for i, _ in batch) == {0: 3, 1: 3, 2: 3, 3: 3}
    # each repeat of an example gets its own augmentation seed
    seeds_by_index: dict[int, set] = {}
    for batch in epoch:
        for index, seed in batch:
            seeds_by_index.setdefault(index, set()).add(seed)
    assert all(len(seeds) == 3 for seeds in seeds_by_index.values())


def test_batch_order_too_few_samples_is_an_error():
    with pytest.raises(DataError) as info:
        BatchOrder(3, 1, 2, 2, 0, seed=0)  # 3 samples < 2 x 2
    message = str(info.value)
    assert "add images" in message
    assert "data.repeats" in message
    assert "train.batch_size" in message
    BatchOrder(3, 2, 2, 2, 0, seed=0)  # raising repeats fixes it


def test_augmentation_seeds_differ_between_epochs():
    order = BatchOrder(4, 1, 4, 1, 0, seed=9)  # one micro-batch per epoch, holding every example
    epochs = [dict(batch) for batch in take(order, 3)]
    assert all(set(e) == {0, 1, 2, 3} for e in epochs)
    for index in range(4):
        seeds = [e[index] for e in epochs]
        assert len(set(seeds)) == 3, f"example {index} reuses an augmentation seed: {seeds}"


# ------------------------------------------------------------------------------ 8. dataset and collate

def make_examples() -> list[Example]:
    return [
        Example("red", "a red square", lambda: Image.new("RGB", (40, 30), RED)),
        Example("blue", "a blue square", lambda: Image.new("RGB", (30, 40), BLUE)),
    ]


def test_caption_dropout_one_empties_captions():
    dataset = ImageCaptionDataset(make_examples(), [(16, 16)] * 2, "center", True, caption_dropout=1.0)
    assert len(dataset) == 2
    assert all(dataset[(i % 2, seed)]["caption"] == "" for i, seed in enumerate(range(20)))


def test_caption_dropout_zero_keeps_captions():
    dataset = ImageCaptionDataset(make_examples(), [(16, 16)] * 2, "center", True, caption_dropout=0.0)
    assert [dataset[(0, s)]["caption"] for s in range(10)] == ["a red square"] * 10
    assert [dataset[(1, s)]["caption"] for s in range(10)] == ["a blue square"] * 10


def test_caption_dropout_partial_is_seeded():
    dataset = ImageCaptionDataset(make_examples(), [(16, 16)] * 2, "center", False, caption_dropout=0.5)
    captions = [dataset[(0, s)]["caption"] for s in range(40)]
    assert "" in captions and "a red square" in captions
    assert captions == [dataset[(0, s)]["caption"] for s in range(40)]


def test_dataset_item_and_collate():
    dataset = ImageCaptionDataset(make_examples(), [(16, 16)] * 2, "center", False, caption_dropout=0.0)
    items = [dataset[(0, 1)], dataset[(1, 2)], dataset[(0, 3)]]
    assert items[0]["pixel_values"].shape == (3, 16, 16)
    assert torch.all(items[1]["pixel_values"][2] == 1.0)  # blue channel of the blue image

    batch = collate(items)
    assert batch["pixel_values"].shape == (3, 3, 16, 16)
    assert torch.equal(batch["pixel_values"][1], items[1]["pixel_values"])
    assert batch["captions"] == ["a red square", "a blue square", "a red square"]


def test_each_item_records_its_original_size_and_where_it_was_cropped():
    """SDXL's micro-conditioning: (original height, width), the crop's top-left in the resized image (measured
    from the other side after a mirror, as kohya mirrors it), and the target size; the same whether pixels or
    cached latents are handed out, and matching where the pixels were really cut."""
    import numpy as np

    # 32x16 (already the cover size of a 16x16 target, so no resize): red channel = 8 x column
    ramp = np.zeros((16, 32, 3), dtype=np.uint8)
    ramp[:, :, 0] = (np.arange(32) * 8)[None, :]
    wide = Example("ramp", "a ramp", lambda: Image.fromarray(ramp), size=(32, 16))
    seen = set()
    for crop in ("center", "random"):
        dataset = ImageCaptionDataset([wide], [(16, 16)], crop, True, caption_dropout=0.0)
        for seed in range(40):
            item = dataset[(0, seed)]
            assert item["original_size"] == (16, 32) and item["target_size"] == (16, 16)
            top, left = item["crop_top_left"]
            red = (item["pixel_values"][0] + 1) * 127.5  # back to 0..255
            first_column = int(round(red[0, 0].item() / 8))
            flipped = first_column > int(round(red[0, -1].item() / 8))
            cut_left = first_column - 15 if flipped else first_column  # where the crop began in the image
            assert top == 0 and left == (32 - (cut_left + 16) if flipped else cut_left)
            seen.add((crop, flipped, left))
    assert ("center", False, 8) in seen and ("center", True, 8) in seen
    assert len({left for crop, _, left in seen if crop == "random"}) > 3  # the corner follows the random crop
    cached = ImageCaptionDataset([wide], [(16, 16)], "center", True, 0.0, latent_keys={(0, False): "a", (0, True): "b"})
    uncached = ImageCaptionDataset([wide], [(16, 16)], "center", True, 0.0)
    for seed in range(10):
        assert {k: v for k, v in cached[(0, seed)].items() if k not in ("latent_key", "pixel_values")} == \
            {k: v for k, v in uncached[(0, seed)].items() if k not in ("latent_key", "pixel_values")}
    batch = collate([uncached[(0, 1)], uncached[(0, 2)]])
    assert batch["conditions"]["original_sizes"].tolist() == [[16, 32], [16, 32]]
    assert batch["conditions"]["crop_top_lefts"].shape == (2, 2)


def test_make_loader_follows_batch_order():
    examples = make_examples()
    dataset = ImageCaptionDataset(examples, [(8, 8)] * 2, "center", False, caption_dropout=0.0)
    order = BatchOrder(len(examples), 2, 2, 1, 0, seed=4)
    loader = make_loader(dataset, order, num_workers=0)
    for keys, batch in zip(take(order, 4), itertools.islice(iter(loader), 4)):
        assert batch["pixel_values"].shape == (2, 3, 8, 8)
        assert batch["captions"] == [examples[i].caption for i, _ in keys]


def test_byte_order_marks_are_dropped_and_non_utf8_metadata_is_named(tmp_path):
    from PIL import Image

    from finetune.data.sources import DataError, list_examples

    folder = tmp_path / "bom"
    folder.mkdir()
    Image.new("RGB", (8, 8), "red").save(folder / "a.png")
    (folder / "a.txt").write_bytes("\ufeffa photo".encode("utf-8"))
    examples = list_examples(str(folder), None, prompt=None, caption_extension=".txt", split="train",
                             image_column="image", caption_column="text", on_bad_image="error")
    assert examples[0].caption == "a photo"
    (folder / "metadata.jsonl").write_bytes('{"file_name": "a.png", "text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="metadata.jsonl is not UTF-8"):
        list_examples(str(folder), None, prompt=None, caption_extension=".txt", split="train",
                      image_column="image", caption_column="text", on_bad_image="error")
