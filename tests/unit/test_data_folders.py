"""Image folders as people sort them (issue 19, case 02-kohya-subfolders): kohya's `<repeats>_<text>` subfolders
repeat their images and caption the ones without a caption file; other subfolders, at any depth, are read too;
nothing is skipped silently; the run's summary lists every folder with its images and repeats."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from finetune.data import BatchOrder, DataError, list_examples
from finetune.recipe.load import parse_recipe
from finetune.training.loop import train
from tests.helpers import draw_concept, recipe_dict


def _examples(folder: Path, prompt: str | None = None):
    return list_examples(str(folder), None, prompt=prompt, caption_extension=".txt", split="train",
                         image_column="image", caption_column="text", on_bad_image="error")


def _uncaptioned(folder: Path, count: int) -> Path:
    draw_concept(folder, count=count)
    for caption in folder.glob("*.txt"):
        caption.unlink()
    return folder


def test_a_kohya_folder_repeats_its_images_and_captions_them_with_its_name(tmp_path):
    _uncaptioned(tmp_path / "train" / "10_a purple sks", 2)
    draw_concept(tmp_path / "train" / "2_other", count=1, caption="its own caption")
    examples = _examples(tmp_path / "train")
    assert [(Path(e.name).parent.name, e.caption, e.repeats) for e in examples] == [
        ("10_a purple sks", "a purple sks", 10), ("10_a purple sks", "a purple sks", 10),
        ("2_other", "its own caption", 2)]  # a caption file wins over the folder's name
    # an epoch draws each image as often as its folder says (times data.repeats)
    order = BatchOrder(len(examples), 1, 1, 1, 0, seed=0, example_repeats=[e.repeats for e in examples])
    assert order.batches_per_epoch == 22
    epoch = Counter()
    iterator = iter(order)
    for _ in range(22):
        epoch.update(index for index, _ in next(iterator))
    assert epoch == {0: 10, 1: 10, 2: 2}


def test_top_level_images_and_nested_subfolders_are_all_read(tmp_path):
    draw_concept(tmp_path / "mixed", count=1)
    draw_concept(tmp_path / "mixed" / "extra" / "deeper", count=2)
    draw_concept(tmp_path / "mixed" / ".thumbnails", count=1)
    examples = _examples(tmp_path / "mixed")
    assert sorted(str(Path(e.name).relative_to(tmp_path / "mixed")) for e in examples) == [
        "0.png", "extra/deeper/0.png", "extra/deeper/1.png"]


def test_a_hidden_folder_is_left_out_with_a_message(tmp_path, caplog):
    draw_concept(tmp_path / "data", count=1)
    draw_concept(tmp_path / "data" / ".cache", count=1)
    with caplog.at_level("INFO"):
        assert len(_examples(tmp_path / "data")) == 1
    assert "left out hidden folder(s) .cache" in caplog.text


def test_a_subfolder_image_without_caption_is_named_with_its_path(tmp_path):
    draw_concept(tmp_path / "data", count=1)
    _uncaptioned(tmp_path / "data" / "sorted", 1)
    with pytest.raises(DataError, match=r"sorted/0\.png.*kohya's way"):
        _examples(tmp_path / "data")
    assert len(_examples(tmp_path / "data", prompt="a shape")) == 2  # data.prompt captions them all


def test_no_images_anywhere_says_where_it_looked(tmp_path):
    (tmp_path / "data" / "empty_sub").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no images in .*data or its 1 subfolder\(s\)"):
        _examples(tmp_path / "data")


def test_a_run_on_kohya_folders_lists_each_folder_with_its_repeats(tiny_base, tmp_path, capsys):
    _uncaptioned(tmp_path / "train" / "3_a purple sks", 2)
    draw_concept(tmp_path / "train", count=1)
    recipe = parse_recipe(recipe_dict(tiny_base, tmp_path / "train", tmp_path / "out", train={"max_steps": 2},
                                      data={"repeats": 2}))
    train(recipe)
    out = capsys.readouterr().out
    assert "data: 3 image(s), 14 samples per epoch with their repeats" in out  # 2 x 3 x 2 + 1 x 2
    assert f"  {(tmp_path / 'train').resolve()}: 1 image(s) x 2 repeat(s)" in out
    assert f"  {(tmp_path / 'train' / '3_a purple sks').resolve()}: 2 image(s) x 6 repeat(s)" in out


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_the_header_gives_the_size_decoding_gives(orientation, tmp_path):
    """`finetune validate` reads sizes from headers (EXIF rotation included); training decodes: they agree."""
    from PIL import Image

    from finetune.data.images import open_image, probe_size

    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (40, 20), "red").save(path, exif=exif)
    assert probe_size(str(path)) == open_image(str(path)).size == ((20, 40) if orientation in (6, 8) else (40, 20))
