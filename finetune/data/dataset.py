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

from finetune.data.images import transform
from finetune.data.sources import DataError, Example


class ImageCaptionDataset(Dataset):
    """Items are addressed by (example index, augmentation seed) keys from `BatchOrder`."""

    def __init__(self, examples: list[Example], resolution: int, crop: str, random_flip: bool,
                 caption_dropout: float):
        self.examples = examples
        self.resolution = resolution
        self.crop = crop
        self.random_flip = random_flip
        self.caption_dropout = caption_dropout

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, aug_seed = key
        rng = random.Random(aug_seed)
        example = self.examples[index]
        pixels = transform(example.load(), self.resolution, self.crop, self.random_flip, rng)
        caption = "" if rng.random() < self.caption_dropout else example.caption
        return {"pixel_values": pixels, "caption": caption}


def collate(items: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "captions": [item["caption"] for item in items],
    }


class BatchOrder:
    """Infinite sequence of micro-batches of dataset keys for one process, starting at `start`.

    Each epoch is a seeded permutation of the examples repeated `repeats` times; every global batch
    holds `batch_size * world_size` keys, of which process `rank` takes its slice. The last partial
    global batch of an epoch is dropped so that all processes always step together.
    """

    def __init__(self, num_examples: int, repeats: int, batch_size: int, world_size: int, rank: int,
                 seed: int, start: int = 0):
        self.num_examples = num_examples
        self.length = num_examples * repeats
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.start = start
        self.batches_per_epoch = self.length // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise DataError(
                f"{num_examples} image(s) x {repeats} repeat(s) = {self.length} samples, fewer than one batch "
                f"across processes (train.batch_size {batch_size} x {world_size} process(es)); "
                "add images, raise data.repeats, or lower train.batch_size"
            )

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        micro = self.start
        while True:
            epoch, position = divmod(micro, self.batches_per_epoch)
            order = self._permutation(epoch)
            for batch in range(position, self.batches_per_epoch):
                first = (batch * self.world_size + self.rank) * self.batch_size
                yield [(order[i] % self.num_examples, self._aug_seed(epoch, order[i]))
                       for i in range(first, first + self.batch_size)]
            micro = (epoch + 1) * self.batches_per_epoch

    def _permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.length, generator=generator).tolist()

    def _aug_seed(self, epoch: int, virtual_index: int) -> int:
        return (self.seed * 1_000_003 + epoch) * 10_000_019 + virtual_index


def make_loader(dataset: ImageCaptionDataset, order: BatchOrder, num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_sampler=order, collate_fn=collate, num_workers=num_workers,
                      persistent_workers=num_workers > 0)
