"""Edit pairs in batches (data.control): a batch shares its target and control sizes, width and height never
swapped; a control image is flipped (and with resize: target, cropped) with its target; the latent cache feeds
predict the control latents an uncached run encodes; the step hands them to predict for both halves; a run
without control images draws exactly the batches it always drew."""
from __future__ import annotations

import hashlib
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.data import BatchOrder, ImageCaptionDataset
from finetune.data.caches import LatentStore
from finetune.data.dataset import collate, uncropped_conditions
from finetune.data.images import transform
from finetune.data.prepare import prepare_data
from finetune.draws import step_draws
from finetune.recipe.schema import ControlOptions, DataOptions
from finetune.training.inputs import BatchEncoder
from finetune.training.step import LossSettings, micro_step_loss
from tests.helpers import default_objective, loaded_family


def _noise_image(path: Path, size: tuple[int, int], seed: int) -> Path:
    """Random RGB pixels of `size` (width, height): any mirror, crop or swap of the sides shows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _pairs(tmp_path: Path, targets: list[tuple[int, int]], controls: list[tuple[int, int]]) -> tuple[Path, Path]:
    images, folder = tmp_path / "images", tmp_path / "controls"
    for i, (target, control) in enumerate(zip(targets, controls)):
        _noise_image(images / f"{i}.png", target, i)
        (images / f"{i}.txt").write_text(f"caption {i}")
        _noise_image(folder / f"{i}.png", control, 100 + i)
    return images, folder


def _batches(d: DataOptions, count: int, batch_size: int = 2, **dataset) -> list[dict]:
    prepared = prepare_data(d, global_batch=batch_size)
    control = d.control.resize if d.control else "target"
    data = ImageCaptionDataset(prepared.examples, prepared.sizes, d.crop, d.random_flip, d.caption_dropout,
                               control_sizes=prepared.control_sizes, control_resize=control, **dataset)
    order = iter(BatchOrder(len(prepared.examples), 1, batch_size, 1, 0, seed=3, groups=prepared.groups))
    return [collate([data[key] for key in next(order)]) for _ in range(count)]


def test_a_batch_shares_target_and_control_sizes_and_never_swaps_width_and_height(tmp_path):
    # wide 48x32 targets; two tall 32x48 controls and two wide ones: two groups, never mixed
    images, controls = _pairs(tmp_path, [(48, 32)] * 4, [(32, 48), (48, 32), (32, 48), (48, 32)])
    grid = {"resolution": 40, "bucket_step": 16, "bucket_min_side": 32, "bucket_max_side": 48}
    d = DataOptions(images=str(images), bucketing=True, random_flip=True, **grid,
                    control=ControlOptions(folders=[str(controls)], resize="bucket"))
    assert prepare_data(d, global_batch=2).groups == [[0, 2], [1, 3]]
    shapes = {(tuple(b["pixel_values"].shape), tuple(b["control_pixel_values"][0].shape)) for b in _batches(d, 8)}
    assert shapes == {((2, 3, 32, 48), (2, 3, 48, 32)), ((2, 3, 32, 48), (2, 3, 32, 48))}
    # without buckets the targets are square and the batches still share each control's size
    square = _batches(replace(d, bucketing=False), 8)
    assert {tuple(b["control_pixel_values"][0].shape) for b in square} == {(2, 3, 48, 32), (2, 3, 32, 48)}
    assert {tuple(b["pixel_values"].shape) for b in square} == {(2, 3, 40, 40)}
    # resize: target brings the tall control to its wide target's size
    target = _batches(replace(d, control=ControlOptions(folders=[str(controls)])), 4)
    assert {tuple(b["control_pixel_values"][0].shape) for b in target} == {(2, 3, 32, 48)}


def test_controls_follow_their_targets_crop_and_flip(tmp_path):
    """resize: target with each control the very image of its target: the control pixels are the target's, for
    every crop corner and flip drawn; resize: bucket mirrors the control when the target is mirrored."""
    images, controls = _pairs(tmp_path, [(96, 64), (64, 96), (80, 80)], [(8, 8)] * 3)
    for i in range(3):
        (controls / f"{i}.png").write_bytes((images / f"{i}.png").read_bytes())
    d = DataOptions(images=str(images), resolution=64, bucketing=True, bucket_step=16, bucket_max_crop=0.9,
                    crop="random", random_flip=True, control=ControlOptions(folders=[str(controls)]))
    prepared = prepare_data(d, global_batch=1)
    data = ImageCaptionDataset(prepared.examples, prepared.sizes, d.crop, True, 0.0,
                               control_sizes=prepared.control_sizes)
    seen = set()
    for index in range(3):
        for aug_seed in range(12):
            item = data[(index, aug_seed)]
            assert torch.equal(item["control_pixels"][0], item["pixel_values"])
            seen.add((index, item["crop_top_left"], item["pixel_values"].flip(-1).equal(item["pixel_values"])))
    assert len(seen) > 3 * 2  # the corners moved and the flips happened
    bucketed = ImageCaptionDataset(prepared.examples, prepared.sizes, "center", True, 0.0,
                                   control_sizes=[((48, 32),)] * 3, control_resize="bucket")
    flips = set()
    for aug_seed in range(8):
        item = bucketed[(0, aug_seed)]
        flipped = not torch.equal(item["pixel_values"], transform(prepared.examples[0].load(), prepared.sizes[0],
                                                                  "center", False))
        wanted = transform(prepared.examples[0].controls[0].load(), (48, 32), "center", flipped)
        assert torch.equal(item["control_pixels"][0], wanted)
        flips.add(flipped)
    assert flips == {True, False}


def _digest(batches: list[dict]) -> str:
    digest = hashlib.sha256()
    for batch in batches:
        digest.update(batch["pixel_values"].numpy().tobytes())
        digest.update(repr(batch["captions"]).encode())
        for _, value in sorted(batch["conditions"].items()):
            digest.update(value.numpy().tobytes())
    return digest.hexdigest()


def test_a_run_without_control_images_draws_exactly_the_batches_it_drew_before(tmp_path):
    """The digest of eight batches of random crops, flips and caption dropout over buckets, as the code before
    data.control drew them (commit 21fdc9e); and the same targets with control images: the same draws."""
    images, controls = _pairs(tmp_path, [(96, 64), (64, 96), (80, 80)] * 2, [(64, 64)] * 6)
    for i, (w, h) in enumerate([(96, 64), (64, 96), (80, 80)] * 2):  # as the digest was made
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(images / f"{i}.png")
    d = DataOptions(images=str(images), resolution=64, bucketing=True, bucket_step=16, bucket_max_crop=0.9,
                    crop="random", random_flip=True, caption_dropout=0.3)
    prepared = prepare_data(d, global_batch=2)
    data = ImageCaptionDataset(prepared.examples, prepared.sizes, d.crop, True, 0.3)
    order = iter(BatchOrder(len(prepared.examples), 2, 2, 1, 0, seed=5, groups=prepared.groups))
    plain = [collate([data[key] for key in next(order)]) for _ in range(8)]
    assert _digest(plain) == "2642ae505d10576ff66410a96af3cfa85cecbbe4c5bf1375de5d45cdc71edb30"
    paired = replace(d, control=ControlOptions(folders=[str(controls)], resize="bucket"))
    prepared = prepare_data(paired, global_batch=2)
    data = ImageCaptionDataset(prepared.examples, prepared.sizes, d.crop, True, 0.3,
                               control_sizes=prepared.control_sizes, control_resize="bucket")
    order = iter(BatchOrder(len(prepared.examples), 2, 2, 1, 0, seed=5, groups=prepared.groups))
    assert _digest([collate([data[key] for key in next(order)]) for _ in range(8)]) == _digest(plain)


def test_cached_control_latents_are_the_ones_an_uncached_step_encodes(tiny_base, tmp_path):
    family, parts, _ = loaded_family(tiny_base)
    images, controls = _pairs(tmp_path, [(32, 32)] * 4, [(48, 32), (48, 32), (40, 40), (40, 40)])
    d = DataOptions(images=str(images), resolution=32, random_flip=True,
                    control=ControlOptions(folders=[str(controls)], resize="bucket"))
    prepared = prepare_data(d, global_batch=2)
    for store in (LatentStore(), LatentStore(tmp_path / "cache")):
        encoder = BatchEncoder(family, parts, torch.device("cpu"), latents=store)
        latent_keys = encoder.cache_latents(prepared.examples, prepared.sizes, True, "training images")
        control_keys = encoder.cache_controls(prepared.examples, prepared.sizes, prepared.control_sizes, "bucket", True)
        assert len(control_keys) == 8 and len({k[0] for k in control_keys.values()}) == 8  # per image and flip
        cached = ImageCaptionDataset(prepared.examples, prepared.sizes, "center", True, 0.0, latent_keys,
                                     prepared.control_sizes, "bucket", control_keys)
        live = ImageCaptionDataset(prepared.examples, prepared.sizes, "center", True, 0.0,
                                   control_sizes=prepared.control_sizes, control_resize="bucket")
        uncached = BatchEncoder(family, parts, torch.device("cpu"))
        for keys in ([(0, 1), (1, 2)], [(2, 5), (3, 6)]):
            from_cache = encoder.control_latents(parts, collate([cached[k] for k in keys]))
            encoded = uncached.control_latents(parts, collate([live[k] for k in keys]))
            assert [c.shape for c in from_cache] == [c.shape for c in encoded] and len(encoded) == 1
            torch.testing.assert_close(from_cache[0], encoded[0], rtol=1e-4, atol=1e-5)


class _KeepsCaptions:
    def prompts(self, captions, generator):
        return captions

    def frozen_base(self, parts):
        return nullcontext(parts)


@pytest.mark.parametrize("prior_mode", ["none", "base_prediction"])
def test_the_step_gives_predict_each_slot_for_every_half(tiny_base, monkeypatch, prior_mode):
    family, parts, _ = loaded_family(tiny_base)
    seen = []
    real = type(family).predict

    def predict(self, parts, noisy, timesteps, conditioning, conditions):
        seen.append((len(noisy), [c.clone() for c in conditions.get("control_latents", [])]))
        return real(self, parts, noisy, timesteps, conditioning, conditions)

    monkeypatch.setattr(type(family), "predict", predict)
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    slots = [torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(s)) * 2 - 1 for s in (1, 2)]
    batch = {"captions": ["a", "b"], "pixel_values": pixels, "conditions": uncropped_conditions(2, 32, 32),
             "control_pixel_values": [slots[0], slots[1][:, :, :16]]}  # the second slot 32 wide, 16 high
    settings = LossSettings(objective=default_objective(family, parts), text_encoder_trains=False,
                            prior_mode=prior_mode, class_prompts=("c",))
    micro_step_loss(family, parts, _KeepsCaptions(), batch, None, step_draws(3, "cpu"), settings,
                    BatchEncoder(family, parts, torch.device("cpu")))
    wanted = [family.control_latents(parts, family.encode_image_moments(parts, p)[0])
              for p in batch["control_pixel_values"]]
    assert [c.shape[-2:] for c in wanted] == [(8, 8), (4, 8)]  # the tiny VAE downsamples by 4
    for rows, controls in seen:  # the frozen base's prediction (the class half alone), then the trained one
        halves = rows // 2
        assert len(controls) == 2
        for got, want in zip(controls, wanted):
            torch.testing.assert_close(got, torch.cat([want] * halves))
    assert [rows for rows, _ in seen] == ([2] if prior_mode == "none" else [2, 4])
