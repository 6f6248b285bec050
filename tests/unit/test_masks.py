"""Masked loss (data.masks, data.unmasked_weight): the mask follows its image through buckets, crops, flips and the
latent cache; a masked region does not train, on every family; bad masks are refused naming the file."""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from finetune.data.caches import LatentStore, fill, pixel_key
from finetune.data.dataset import ImageCaptionDataset, uncropped_conditions
from finetune.data.masks import latent_mask, latent_weights, transform_mask
from finetune.data.prepare import prepare_data
from finetune.data.sources import DataError
from finetune.draws import step_draws
from finetune.models import specs
from finetune.models.tiny import save_tiny_pipeline
from finetune.recipe.load import RecipeError, parse_recipe
from finetune.recipe.schema import DataOptions
from finetune.report.history import read_history
from finetune.training.inputs import BatchEncoder
from finetune.training.loop import train
from finetune.training.step import LossSettings, micro_step_loss
from tests.helpers import default_objective, draw_concept, loaded_family, recipe_dict


def _pattern(width: int, height: int, seed: int) -> np.ndarray:
    """Gray blocks of random levels, lopsided so that a mirror or a shifted crop shows."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(height // 8, width // 8), dtype=np.uint8)
    return np.kron(blocks, np.ones((8, 8), dtype=np.uint8))


def _images_with_masks(tmp_path: Path, sizes: list[tuple[int, int]]) -> tuple[Path, Path]:
    """Gray images whose masks are the same picture as grayscale (so pixels and mask must stay aligned);
    a mask's suffix differs from its image's."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    for i, (width, height) in enumerate(sizes):
        gray = _pattern(width, height, i)
        Image.fromarray(np.stack([gray] * 3, axis=-1)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text("a gray pattern")
        Image.fromarray(gray).save(masks / f"{i}.webp", lossless=True)
    return images, masks


def test_mask_follows_its_image_through_buckets_random_crops_and_flips(tmp_path):
    images, masks = _images_with_masks(tmp_path, [(96, 64), (64, 96), (80, 80)])
    d = DataOptions(images=str(images), masks=str(masks), resolution=64, bucketing=True, bucket_step=16,
                    bucket_max_crop=0.9, crop="random", random_flip=True)
    prepared = prepare_data(d, global_batch=1)
    assert len(set(prepared.sizes)) == 3  # three buckets
    dataset = ImageCaptionDataset(prepared.examples, prepared.sizes, d.crop, d.random_flip, 0.0)
    seen = set()
    for index in range(3):
        for aug_seed in range(12):
            item = dataset[(index, aug_seed)]
            mask = item["mask"][0]
            assert mask.shape == item["pixel_values"].shape[1:] == prepared.sizes[index][::-1]
            # the same resampling, crop and mirror: the mask is the image's gray level, pixel for pixel
            torch.testing.assert_close(mask, (item["pixel_values"][0] + 1) / 2, atol=1e-6, rtol=0)
            seen.add((index, item["crop_top_left"], mask.flip(-1).equal(mask)))
    assert len(seen) > 3 * 2  # crops moved and flips happened, and the masks followed each


def test_the_latent_cache_keeps_each_variants_own_mask(tmp_path):
    images, masks = _images_with_masks(tmp_path, [(48, 32), (32, 32)])
    prepared = prepare_data(DataOptions(images=str(images), masks=str(masks), resolution=32), global_batch=1)
    examples, sizes = prepared.examples, prepared.sizes

    def encode(pixels):  # a stand-in VAE downsampling by 4
        moments = torch.nn.functional.avg_pool2d(pixels, 4)
        return moments, moments.abs()

    for store in (LatentStore(), LatentStore(tmp_path / "cache")):
        keys, encoded = fill(store, examples, sizes, True, "vae", encode, "t", show_progress=False)
        assert encoded == 4
        for index in range(2):
            pixel_mask = transform_mask(examples[index].mask(), sizes[index], "center", False)
            kept, mirrored = store.masks([keys[(index, False)]])[0], store.masks([keys[(index, True)]])[0]
            assert kept.shape == (1, 8, 8)
            torch.testing.assert_close(kept, latent_mask(pixel_mask, (8, 8)))
            torch.testing.assert_close(mirrored, kept.flip(-1))
            assert not torch.equal(mirrored, kept)
            # a mask changed is another entry; without masks the keys are the ones caches always had
            pixels = torch.zeros(3, 32, 32)
            assert pixel_key(pixels, "vae", pixel_mask) != pixel_key(pixels, "vae", 1 - pixel_mask)
            assert pixel_key(pixels, "vae", None) == pixel_key(pixels, "vae")
    again = LatentStore(tmp_path / "cache")  # a later run finds the entries, masks and all, on disk
    keys, encoded = fill(again, examples, sizes, True, "vae", encode, "t", show_progress=False)
    assert encoded == 0 and again.masks([keys[(1, True)]]) is not None
    assert LatentStore().masks(["no-mask"]) is None


def test_unmasked_weight_blends_and_cells_average():
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :, :2] = 1  # a quarter of the first 4x4 cell's columns... half of each 4-wide cell's left part
    weights = latent_weights(mask, (2, 2), 0.2)
    torch.testing.assert_close(weights[0, 0], torch.tensor([[0.2 + 0.8 * 0.5, 0.2], [0.2 + 0.8 * 0.5, 0.2]]))


class _KeepsCaptions:
    """The strategy seam micro_step_loss uses, with nothing injected: the base trains as it is."""

    def prompts(self, captions, generator):
        return captions

    def frozen_base(self, parts):
        return nullcontext(parts)


def _capture_prediction(family, monkeypatch) -> list[torch.Tensor]:
    predictions = []
    real = type(family).predict

    def predict(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if out.requires_grad:  # the trained prediction (not prior preservation's frozen one)
            out.retain_grad()
            predictions.append(out)
        return out

    monkeypatch.setattr(type(family), "predict", predict)
    return predictions


def _masked_step(family, parts, masks, unmasked_weight=0.0, prior_mode="none", prior_weight=1.0):
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    batch = {"captions": ["a", "b"], "pixel_values": pixels, "conditions": uncropped_conditions(2, 32, 32)}
    if masks is not None:
        batch["masks"] = masks
    settings = LossSettings(objective=default_objective(family, parts), text_encoder_trains=False,
                            prior_mode=prior_mode, prior_weight=prior_weight, class_prompts=("c",),
                            unmasked_weight=unmasked_weight)
    return micro_step_loss(family, parts, _KeepsCaptions(), batch, None, step_draws(3, "cpu"), settings,
                           BatchEncoder(family, parts, torch.device("cpu")))


@pytest.mark.parametrize("name", sorted(specs()))
def test_a_masked_region_does_not_train_on_any_family(name, tmp_path, monkeypatch):
    try:
        family, parts, _ = loaded_family(save_tiny_pipeline(tmp_path / name, family=name))
    except ImportError as exc:  # a family whose optional module is not installed here
        pytest.skip(str(exc))
    for name_of_part, module in parts.modules.items():  # the denoiser trains whole, the rest is frozen
        module.requires_grad_(name_of_part == parts.denoiser_name)
    predictions = _capture_prediction(family, monkeypatch)
    masks = torch.ones(2, 1, 32, 32)
    masks[:, :, :, :16] = 0  # the left half of every image is left out
    _masked_step(family, parts, masks).backward()
    gradient = predictions[-1].grad  # the unpacked latent grid, as the loss sees it
    width = gradient.shape[-1]
    assert torch.all(gradient[..., : width // 2] == 0), "the masked half trained"
    assert torch.all(gradient[..., width // 2:].abs().sum(dim=(1, 2)) > 0)
    # an all-white mask is no mask, bit for bit (the golden losses of unmasked runs stand)
    plain = _masked_step(family, parts, None)
    assert torch.equal(_masked_step(family, parts, torch.ones(2, 1, 32, 32)), plain)
    assert _masked_step(family, parts, torch.zeros(2, 1, 32, 32)).item() == 0.0
    half = _masked_step(family, parts, torch.zeros(2, 1, 32, 32), unmasked_weight=0.5).item()
    assert half == pytest.approx(0.5 * plain.item(), rel=1e-5)


def test_prior_preservation_half_is_not_masked(tiny_base):
    family, parts, _ = loaded_family(tiny_base)
    black = torch.zeros(2, 1, 32, 32)
    instance_only = _masked_step(family, parts, None, prior_mode="base_prediction", prior_weight=0.0).item()
    both = _masked_step(family, parts, None, prior_mode="base_prediction").item()
    prior_only = _masked_step(family, parts, black, prior_mode="base_prediction").item()
    assert prior_only > 0
    assert prior_only == pytest.approx(both - instance_only, rel=1e-5)


def test_masked_training_with_the_latent_cache_is_the_training_without_it(tiny_base, tmp_path):
    images = draw_concept(tmp_path / "images")
    masks = tmp_path / "masks"
    masks.mkdir()
    for i in range(4):
        mask = np.zeros((32, 32), dtype=np.uint8)
        mask[:, 4 * i: 20 + 2 * i] = 255
        Image.fromarray(mask).save(masks / f"{i}.png")

    def run(name, data, cache):
        recipe = parse_recipe(recipe_dict(tiny_base, images, tmp_path / name, cache=cache,
                                          data={"random_flip": True, **data},
                                          train={"max_steps": 4, "batch_size": 2, "learning_rate": 1e-3}))
        artifact = load_file(train(recipe))
        return artifact, [row["loss"] for row in read_history(tmp_path / name)]

    masked = {"masks": str(masks), "unmasked_weight": 0.1}
    plain, plain_losses = run("plain", masked, {"latents": "off"})
    cached, cached_losses = run("cached", masked, {"latents": "memory"})
    on_disk, disk_losses = run("disk", masked, {"latents": "disk", "dir": str(tmp_path / "latents")})
    unmasked, unmasked_losses = run("unmasked", {}, {"latents": "off"})
    np.testing.assert_allclose(cached_losses, plain_losses, rtol=1e-4)
    assert disk_losses == cached_losses
    for key in plain:
        torch.testing.assert_close(cached[key], plain[key], rtol=1e-3, atol=2e-5)
    assert all(m < 0.8 * u for m, u in zip(plain_losses, unmasked_losses))  # most pixels weigh 0.1


def _write_gray(path: Path, size=(32, 32), mode="L") -> Path:
    Image.new(mode, size, 255).save(path)
    return path


@pytest.mark.parametrize("decode", [False, True])
@pytest.mark.parametrize("case, says", [
    ("missing", "2.png: no mask 2.* in"),
    ("unreadable", "2.png (mask of"),
    ("wrong size", "2.png is 16x32, its image"),
    ("ambiguous", "several masks match it (2.jpg, 2.png)"),
    ("no alpha", "0.png has no alpha channel (mode RGB)"),
])
def test_bad_masks_are_refused_naming_the_file(tmp_path, case, says, decode):
    images = draw_concept(tmp_path / "images")
    masks = tmp_path / "masks"
    masks.mkdir()
    for i in range(4):
        _write_gray(masks / f"{i}.png")
    if case == "missing":
        (masks / "2.png").unlink()
    elif case == "unreadable":
        (masks / "2.png").write_bytes(b"not a png")
    elif case == "wrong size":
        _write_gray(masks / "2.png", (16, 32))
    elif case == "ambiguous":
        _write_gray(masks / "2.jpg")
    option = "alpha" if case == "no alpha" else str(masks)
    with pytest.raises(DataError, match="data.masks") as raised:
        prepare_data(DataOptions(images=str(images), masks=option, resolution=32), 1, decode=decode)
    assert says in str(raised.value)


def test_alpha_masks_and_mirrored_subfolders_are_found(tmp_path):
    images = tmp_path / "images"
    (images / "10_cat").mkdir(parents=True)
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 8, 32))
    rgba.save(images / "10_cat" / "a.png")
    example = prepare_data(DataOptions(images=str(images), masks="alpha", resolution=32), 1).examples[0]
    alpha = transform_mask(example.mask(), (32, 32), "center", False)[0]
    assert alpha[:, :8].min() == 1 and alpha[:, 8:].max() == 0
    assert example.load().mode == "RGB"  # the pixels trained on are as without masks
    masks = tmp_path / "masks"
    (masks / "10_cat").mkdir(parents=True)
    _write_gray(masks / "a.png", mode="L")  # a flat one by the stem ...
    Image.new("L", (32, 32), 7).save(masks / "10_cat" / "a.jpg")  # ... loses to the mirrored path
    example = prepare_data(DataOptions(images=str(images), masks=str(masks), resolution=32), 1).examples[0]
    assert np.asarray(example.mask()).max() < 20


@pytest.mark.parametrize("data, says", [
    ({"unmasked_weight": 1.5}, "data.unmasked_weight: must be between 0 and 1 (0: black pixels do not train"),
    ({"masks": "alpha", "images": None, "dataset": "some/dataset"}, "data.masks: masks are read beside"),
    ({"masks": "/no/such/masks"}, "data.masks: /no/such/masks is not an existing folder"),
    ({"masks": "INSIDE"}, "lies inside data.images"),
])
def test_recipe_checks_refuse_masks_that_cannot_work(tiny_base, tmp_path, data, says):
    images = draw_concept(tmp_path / "images")
    if data.get("masks") == "INSIDE":
        (images / "masks").mkdir()
        data = {"masks": str(images / "masks")}
    with pytest.raises(RecipeError) as raised:  # parse_recipe runs the checks, as `finetune validate` does
        parse_recipe(recipe_dict(tiny_base, images, tmp_path / "out", data=data))
    assert says in str(raised.value)


def test_a_relative_mask_folder_is_read_beside_the_recipe_and_alpha_is_not_a_path(tiny_base, tmp_path, monkeypatch):
    """data.masks follows the rule of every path key: relative to the recipe file's folder, whatever the working
    directory (a masks/ folder there must not be picked up instead); `alpha` is left as it is."""
    import yaml

    from finetune.recipe.load import load_recipe

    project = tmp_path / "project"
    images = draw_concept(project / "images")
    (project / "masks").mkdir()
    data = recipe_dict(tiny_base, images, "out")
    data["data"].update(images="images", masks="masks")
    (project / "r.yaml").write_text(yaml.safe_dump(data))
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "masks").mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    assert load_recipe(project / "r.yaml").data.masks == str(project / "masks")
    assert load_recipe(project / "r.yaml", ["data.masks=alpha"]).data.masks == "alpha"
