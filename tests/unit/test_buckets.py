"""Aspect-ratio bucketing: derived buckets, nearest-shape assignment, one bucket per batch, the report."""
from __future__ import annotations

import itertools
import json

import pytest
import yaml
from PIL import Image, ImageDraw

from finetune.cli import main
from finetune.data import BatchOrder
from finetune.data.buckets import derive_buckets, nearest_bucket, plan_buckets
from finetune.recipe.load import parse_recipe
from finetune.training.loop import train
from tests.helpers import recipe_dict


def test_derived_buckets_keep_the_area_and_the_steps():
    buckets = derive_buckets(512 * 512, 64, 256, 1024)
    assert (512, 512) in buckets and (768, 320) in buckets and (320, 768) in buckets
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert all(256 <= side <= 1024 for bucket in buckets for side in bucket)
    assert max(w / h for w, h in buckets) == 1024 / 256


@pytest.mark.parametrize("resolution", [32, 64, 256, 512, 1024])
def test_the_default_grid_follows_the_resolution_and_always_yields_buckets(resolution):
    from finetune.data.buckets import default_grid

    step, min_side, max_side = default_grid(resolution, None, None, None)
    buckets = derive_buckets(resolution * resolution, step, min_side, max_side)
    assert (resolution, resolution) in buckets and any(w > h for w, h in buckets)
    if resolution == 512:
        assert (step, min_side, max_side) == (64, 256, 1024)  # kohya's defaults where they were made for
    assert default_grid(resolution, 16, 64, 128) == (16, 64, 128)  # given values are kept


def test_bucketing_below_the_old_smallest_side_trains(tiny_base, tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    for i, size in enumerate([(64, 64), (64, 64), (96, 64), (96, 64)]):
        Image.new("RGB", size, "red").save(images / f"{i}.png")
        (images / f"{i}.txt").write_text("a red block")
    recipe = parse_recipe(recipe_dict(tiny_base, images, tmp_path / "out", train={"max_steps": 2, "batch_size": 2},
                                      data={"resolution": 64, "bucketing": True}))
    assert train(recipe).is_file()
    sizes = {(b["width"], b["height"]) for b in json.loads((tmp_path / "out" / "buckets.json").read_text())["buckets"]}
    assert (64, 64) in sizes and any(w > h for w, h in sizes)


def test_each_image_goes_to_the_bucket_nearest_its_shape():
    buckets = [(512, 512), (768, 320), (320, 768), (640, 384)]
    assert nearest_bucket((1000, 1000), buckets) == (512, 512)
    assert nearest_bucket((1920, 1080), buckets) == (640, 384)  # 16:9 is nearer 5:3 than 12:5
    assert nearest_bucket((600, 1500), buckets) == (320, 768)


def test_plan_skips_with_reasons():
    names = ["square", "square2", "wide", "panorama", "tall"]
    sizes = [(100, 100), (90, 90), (200, 100), (1000, 100), (100, 200)]
    plan = plan_buckets(names, sizes, [(64, 64), (96, 48), (48, 96)], max_crop=0.5, global_batch=2,
                        repeats=[1] * 5)
    assert plan.groups == {(64, 64): [0, 1]}
    skipped = dict(plan.skipped)
    assert "crop away 80%" in skipped["panorama"]  # 10:1 into 2:1
    assert "bucket 96x48 holds 1 image(s), 1 sample(s) with repeats, fewer than one batch (2)" in skipped["wide"]
    assert "fewer than one batch" in skipped["tall"]
    report = plan.report(global_batch=2, repeats=[1] * 5)
    assert report["buckets"] == [{"width": 64, "height": 64, "images": 2, "batches_per_epoch": 1}]
    # with repeats the lone images fill a batch and stay
    assert (96, 48) in plan_buckets(names, sizes, [(64, 64), (96, 48)], 0.5, 2, repeats=[2] * 5).groups
    # a kohya folder's repeats count too: the lone wide image from a `2_name` folder fills a batch alone
    assert (96, 48) in plan_buckets(names, sizes, [(64, 64), (96, 48)], 0.5, 2, repeats=[1, 1, 2, 1, 1]).groups


def test_batches_never_mix_buckets_and_resume_exactly():
    groups = [[0, 1, 2, 3], [4, 5, 6], [7, 8]]
    order = BatchOrder(9, 2, 2, 1, 0, seed=3, groups=groups)
    assert order.batches_per_epoch == 4 + 3 + 2
    batches = list(itertools.islice(iter(order), 3 * order.batches_per_epoch))
    member = {i: g for g, group in enumerate(groups) for i in group}
    assert all(len({member[i] for i, _ in batch}) == 1 for batch in batches)
    assert {member[batch[0][0]] for batch in batches[:order.batches_per_epoch]} == {0, 1, 2}
    later = list(itertools.islice(iter(BatchOrder(9, 2, 2, 1, 0, seed=3, start=5, groups=groups)), 10))
    assert later == batches[5:15]
    # two processes split each global batch, which still comes from one bucket
    halves = [list(itertools.islice(iter(BatchOrder(9, 2, 1, 2, r, seed=3, groups=groups)), 9)) for r in (0, 1)]
    assert all(member[a[0][0]] == member[b[0][0]] for a, b in zip(*halves))


def _mixed_folder(folder):
    folder.mkdir()
    shapes = {"sq": (32, 32), "sq2": (40, 40), "wide": (64, 32), "wide2": (60, 28), "tall": (24, 48),
              "strip": (200, 20)}
    for name, size in shapes.items():
        image = Image.new("RGB", size, "white")
        ImageDraw.Draw(image).ellipse((2, 2, size[0] - 3, size[1] - 3), fill=(160, 0, 160))
        image.save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text("a purple sks")
    return folder


def test_a_bucketed_run_trains_and_reports(tiny_base, tmp_path, capsys):
    images = _mixed_folder(tmp_path / "mixed")
    recipe = parse_recipe(recipe_dict(
        tiny_base, images, tmp_path / "out", train={"max_steps": 4, "batch_size": 2},
        data={"resolution": 32, "bucketing": True, "buckets": [[32, 32], [48, 24], [24, 48]]}))
    train(recipe)
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    report = json.loads((tmp_path / "out" / "buckets.json").read_text())
    assert report["buckets"] == [{"width": 32, "height": 32, "images": 2, "batches_per_epoch": 1},
                                 {"width": 48, "height": 24, "images": 2, "batches_per_epoch": 1}]
    reasons = {s["image"].rsplit("/", 1)[-1]: s["reason"] for s in report["skipped"]}
    assert set(reasons) == {"tall.png", "strip.png"}
    assert "fewer than one batch" in reasons["tall.png"] and "crop away" in reasons["strip.png"]
    out = capsys.readouterr().out
    assert "48x24" in out and "skipped 2 image(s)" in out


@pytest.mark.parametrize("data, expected", [
    ({"bucketing": True, "buckets": [[30, 32]]}, "data.buckets: [30, 32] should be [width, height]"),
    ({"bucketing": True, "bucket_step": 60}, "data.bucket_step: must be a positive multiple of 8"),
    ({"bucketing": True, "bucket_max_crop": 1.5}, "data.bucket_max_crop"),
    # kohya's 256 at 32 px: no side of 256 fits in 32 x 32; the fix is named
    ({"bucketing": True, "bucket_min_side": 256}, "data.bucket_min_side: 256 leaves no bucket"),
    ({"bucketing": True, "prior": {"mode": "class_images", "class_prompt": ["a shape"]}},
     "use prior.mode: base_prediction with buckets"),
])
def test_validate_refuses_bad_buckets(tiny_base, concept_dir, tmp_path, data, expected, capsys):
    prior = data.pop("prior", {})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(tiny_base, concept_dir, tmp_path / "out", data=data, prior=prior)))
    assert main(["validate", str(path)]) == 2
    assert expected in capsys.readouterr().err
