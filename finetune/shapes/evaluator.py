"""The shapes-world judge: a small CNN that names the shape, colour and size in a 32x32 image.

It is trained on freshly drawn images of all eight shapes (held-out ones included, so it can recognise a star
the base never drew) by data_examples/shapes/train_evaluator.py, and shipped as evaluator.safetensors with
its configuration in the file's metadata.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from finetune.shapes.paths import default_evaluator_path
from finetune.shapes.world import ALL_SHAPES, COLOURS, IMAGE_SIZE, SIZES, sample_dataset, to_array

HEADS = ("shape", "colour", "size")
DEFAULT_CONFIG = {"widths": [24, 48, 96, 128], "hidden": 128, "image_size": IMAGE_SIZE,
                  "shape": list(ALL_SHAPES), "colour": list(COLOURS), "size": list(SIZES)}


class ShapeJudge(nn.Module):
    """Four conv blocks halving the resolution, global average+max pooling, and one linear head per label."""

    def __init__(self, config: dict = DEFAULT_CONFIG):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for i, width in enumerate(config["widths"]):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
            if i < len(config["widths"]) - 1:
                layers.append(nn.MaxPool2d(2))
            channels = width
        self.features = nn.Sequential(*layers)
        # the average sees how much of the image is coloured (size); the max keeps small shapes' details
        self.trunk = nn.Sequential(nn.Linear(2 * channels, config["hidden"]), nn.ReLU())
        self.heads = nn.ModuleDict({name: nn.Linear(config["hidden"], len(config[name])) for name in HEADS})

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.features(pixels)
        pooled = torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1)
        hidden = self.trunk(pooled)
        return {name: head(hidden) for name, head in self.heads.items()}


def images_to_pixels(images: Sequence[Image.Image], image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """PIL images -> float tensor (N, 3, H, W) in [-1, 1], resized to the size the judge was trained at."""
    resized = [im.convert("RGB") if im.size == (image_size, image_size)
               else im.convert("RGB").resize((image_size, image_size), Image.Resampling.LANCZOS) for im in images]
    return torch.from_numpy(to_array(resized)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class Evaluator:
    def __init__(self, model: ShapeJudge, config: dict):
        self.model = model.eval()
        self.config = config

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Evaluator":
        """The shipped evaluator by default (see finetune.shapes.paths), or the safetensors file at `path`."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path) if path is not None else default_evaluator_path()
        with safe_open(str(path), framework="pt") as handle:
            config = json.loads(handle.metadata()["config"])
        model = ShapeJudge(config)
        model.load_state_dict(load_file(str(path)))
        return cls(model, config)

    def save(self, path: str | Path) -> Path:
        from finetune.io.safetensors_io import save_safetensors

        state = {name: tensor.contiguous() for name, tensor in self.model.state_dict().items()}
        return save_safetensors(state, path, {"config": json.dumps(self.config)})

    @torch.no_grad()
    def logits(self, images: Sequence[Image.Image], batch: int = 256) -> dict[str, torch.Tensor]:
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in HEADS}
        for start in range(0, len(images), batch):
            pixels = images_to_pixels(images[start:start + batch], self.config["image_size"])
            for name, scores in self.model(pixels).items():
                parts[name].append(scores)
        return {name: torch.cat(chunks) if chunks else torch.empty(0) for name, chunks in parts.items()}

    def classify(self, images: Sequence[Image.Image]) -> list[dict[str, str]]:
        """One {"shape": ..., "colour": ..., "size": ...} verdict per image."""
        if len(images) == 0:
            return []
        best = {name: scores.argmax(dim=1).tolist() for name, scores in self.logits(images).items()}
        return [{name: self.config[name][best[name][i]] for name in HEADS} for i in range(len(images))]


def ground_truth_accuracy(evaluator: Evaluator, n: int = 800, seed: int = 12345,
                          shapes: Sequence[str] = ALL_SHAPES) -> dict[str, float]:
    """Share of freshly drawn images whose shape, colour and size the evaluator names right."""
    samples = sample_dataset(n, seed, shapes=shapes)
    verdicts = evaluator.classify([image for image, _, _ in samples])
    return {name: float(np.mean([v[name] == labels[name] for v, (_, _, labels) in zip(verdicts, samples)]))
            for name in HEADS}
