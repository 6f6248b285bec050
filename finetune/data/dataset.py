"""The training stream: a map-style dataset plus a batch order that depends only on (seed, position).

Because each micro-batch's contents and augmentations are a pure function of the seed and the micro-batch's
position, a resumed run sees exactly the batches the uninterrupted run would have seen, on any number of
processes, without storing data-loader state.
"""
from __future__ import annotations

import random
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from finetune.data.control_sizes import control_pixels
from finetune.data.images import size_conditions, transform
from finetune.data.masks import transform_mask
from finetune.data.sources import DataError, Example


class ImageCaptionDataset(Dataset):
    """Items are addressed by (example index, augmentation seed) keys from `BatchOrder`.

    `sizes[i]` is example i's training (width, height): the resolution squared, or its bucket's. With
    `latent_keys` ((index, flipped) -> latent cache key) an item names its cached latents instead of carrying
    pixels; the random draws are the same either way (flip, then a random crop's corner, then caption dropout).
    With data.control, `control_sizes[i]` is example i's control sizes, one per slot, sized by `control_resize`
    (data/control_sizes.py); an item carries their pixels, flipped with the target, or with `control_keys`
    ((index, flipped) -> one cache key per slot) their cached latents' keys. No control draws anything at random.
    """

    def __init__(self, examples: list[Example], sizes: list[tuple[int, int]], crop: str, random_flip: bool,
                 caption_dropout: float, latent_keys: dict[tuple[int, bool], str] | None = None,
                 control_sizes: list[tuple[tuple[int, int], ...]] | None = None, control_resize: str = "target",
                 control_keys: dict[tuple[int, bool], list[str]] | None = None):
        self.examples = examples
        self.sizes = sizes
        self.crop = crop
        self.random_flip = random_flip
        self.caption_dropout = caption_dropout
        self.latent_keys = latent_keys
        self.control_sizes = control_sizes
        self.control_resize = control_resize
        self.control_keys = control_keys

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, aug_seed = key
        rng = random.Random(aug_seed)
        example = self.examples[index]
        flip = self.random_flip and rng.random() < 0.5
        target = self.sizes[index]
        if self.latent_keys is not None:
            # cached latents are centre crops; the image's size is known from reading it before training (class
            # images, drawn at the training size, are that size); a mask is cached beside its latent
            item = {"latent_key": self.latent_keys[(index, flip)]}
            if self.control_keys is not None:  # cached beside the target's, per size and flip (data/caches.py)
                item["control_keys"] = self.control_keys[(index, flip)]
            elif self.control_sizes is not None:  # placed as the cached target was: centred
                item["control_pixels"] = control_pixels(example, target, self.control_sizes[index],
                                                        self.control_resize, "center", flip)
            conditions = size_conditions(example.size or target, target, "center", flip)
        else:
            image = example.load()
            # the crop's corner, drawn once, places both the pixels and the conditions
            state = rng.getstate()
            item = {"pixel_values": transform(image, target, self.crop, flip, rng)}
            rng.setstate(state)
            if example.mask is not None:  # the same corner, so the mask covers what the pixels show
                item["mask"] = transform_mask(example.mask(), target, self.crop, flip, rng)
                rng.setstate(state)
            if self.control_sizes is not None:  # the same corner and flip (with resize: target); rng left as it was
                item["control_pixels"] = control_pixels(example, target, self.control_sizes[index],
                                                        self.control_resize, self.crop, flip, rng)
            conditions = size_conditions(image.size, target, self.crop, flip, rng)
        item["original_size"], item["crop_top_left"], item["target_size"] = conditions
        item["caption"] = "" if rng.random() < self.caption_dropout else example.caption
        return item


def collate(items: list[dict]) -> dict:
    """A batch: captions, latent keys or pixels (and their loss masks, data/masks.py; with data.control, the control
    images' pixels or cache keys, a list with one entry per slot), and `conditions`: what each image tells the model
    besides its pixels, as [batch, 2] integer tensors (SDXL's `original_sizes`, `crop_top_lefts`, `target_sizes`, each
    (height, width) or (top, left)); a family's `predict` takes what it uses."""
    batch = {"captions": [item["caption"] for item in items],
             "conditions": {f"{key}s": torch.tensor([item[key] for item in items], dtype=torch.long)
                            for key in ("original_size", "crop_top_left", "target_size")}}
    if "latent_key" in items[0]:
        batch["latent_keys"] = [item["latent_key"] for item in items]
    else:
        batch["pixel_values"] = torch.stack([item["pixel_values"] for item in items])
    if "mask" in items[0]:
        batch["masks"] = torch.stack([item["mask"] for item in items])  # [batch, 1, height, width] in [0, 1]
    if "control_pixels" in items[0]:  # one [batch, 3, height_i, width_i] per control slot (the batch shares sizes)
        batch["control_pixel_values"] = [torch.stack(slot)
                                         for slot in zip(*[item["control_pixels"] for item in items])]
    if "control_keys" in items[0]:  # one list of cache keys per control slot
        batch["control_latent_keys"] = [list(slot) for slot in zip(*[item["control_keys"] for item in items])]
    return batch


def uncropped_conditions(count: int, height: int, width: int) -> dict[str, torch.Tensor]:
    """`conditions` for `count` images that were neither resized nor cropped, (height, width) pixels: what a
    sampling pipeline assumes (SDXL's original size = target size, corner (0, 0))."""
    size = torch.tensor([[height, width]] * count, dtype=torch.long)
    return {"original_sizes": size, "crop_top_lefts": torch.zeros_like(size), "target_sizes": size.clone()}


class BatchOrder:
    """Infinite sequence of micro-batches of dataset keys for one process, starting at `start`.

    Each epoch permutes each group's examples (all examples, or one group per bucket), each repeated `repeats`
    times its own `example_repeats` (kohya's `10_name` folders),
    cuts every group into global batches of `batch_size * world_size` keys (a group's last partial batch is
    dropped, so that all processes always step together and a batch never mixes buckets), and, with several
    groups, shuffles the batches. Process `rank` takes its slice of each global batch.
    """

    def __init__(self, num_examples: int, repeats: int, batch_size: int, world_size: int, rank: int,
                 seed: int, start: int = 0, groups: list[list[int]] | None = None,
                 example_repeats: list[int] | None = None):
        self.num_examples = num_examples
        self.repeats = repeats
        self.example_repeats = example_repeats or [1] * num_examples
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.start = start
        self.groups = groups if groups is not None else [list(range(num_examples))]
        global_batch = batch_size * world_size
        self.batches_per_epoch = sum(len(self._pool(g)) // global_batch for g in self.groups)
        if self.batches_per_epoch == 0:
            count = sum(len(g) for g in self.groups)
            samples = sum(len(self._pool(g)) for g in self.groups)
            raise DataError(
                f"{count} image(s) x their repeats = {samples} samples, fewer than one batch "
                f"across processes (train.batch_size {batch_size} x {world_size} process(es))"
                + (" in any bucket" if len(self.groups) > 1 else "")
                + "; add images, raise data.repeats, or lower train.batch_size"
            )

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        micro = self.start
        while True:
            epoch, position = divmod(micro, self.batches_per_epoch)
            batches = self._epoch(epoch)
            for batch in batches[position:]:
                first = self.rank * self.batch_size
                yield [(v % self.num_examples, self._aug_seed(epoch, v))
                       for v in batch[first:first + self.batch_size]]
            micro = (epoch + 1) * self.batches_per_epoch

    def _epoch(self, epoch: int) -> list[list[int]]:
        """The epoch's global batches, as virtual indices (example + num_examples x repeat)."""
        global_batch = self.batch_size * self.world_size
        batches = []
        for number, group in enumerate(self.groups):
            # group 0's seed is the one a run without buckets has always used, so its batches stay as they were
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch + 7_919 * number)
            pool = self._pool(group)
            length = len(pool)
            order = torch.randperm(length, generator=generator).tolist()
            virtual = [pool[i] for i in order]
            batches += [virtual[b:b + global_batch] for b in range(0, length - global_batch + 1, global_batch)]
        if len(self.groups) > 1:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch + 104_729)
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return batches

    def _pool(self, group: list[int]) -> list[int]:
        """The group's samples of one epoch as virtual indices, example + num_examples x (its n-th copy): round
        after round of the group, each example as many times as its own repeats (all 1: exactly the order a
        run without per-example repeats has always drawn)."""
        copies: dict[int, int] = {}
        pool = []
        for _ in range(self.repeats):
            for example in group:
                for _ in range(self.example_repeats[example]):
                    pool.append(example + self.num_examples * copies.get(example, 0))
                    copies[example] = copies.get(example, 0) + 1
        return pool

    def _aug_seed(self, epoch: int, virtual_index: int) -> int:
        return (self.seed * 1_000_003 + epoch) * 10_000_019 + virtual_index


def make_loader(dataset: ImageCaptionDataset, order: BatchOrder, num_workers: int,
                pin_memory: bool = False) -> DataLoader:
    """The batches in `order`. `pin_memory`: batches in page-locked memory, which a GPU copies from without the
    host waiting (True when training on CUDA)."""
    return DataLoader(dataset, batch_sampler=order, collate_fn=collate, num_workers=num_workers,
                      persistent_workers=num_workers > 0, pin_memory=pin_memory)
