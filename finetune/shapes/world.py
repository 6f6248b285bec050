"""The shapes world: 32x32 RGB images of one filled shape on white, drawn procedurally from a seed.

The base model learns `BASE_SHAPES` in every colour and size; `HELD_OUT_SHAPES` never reach it, so a
fine-tuning method that makes the base draw a star has taught it something new. Captions name colour and
shape ("a red circle"), and for the base's training set half of them also name the size ("a big red circle"),
except for one combination, `UNNAMED_LOOK` (big green diamonds): the base draws those but never hears their
size named with them, so it has no word for that look. Textual inversion and the `known_look` concept rely
on this: "big" steers size through the text, so a learned word can reach the look.
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
# shapes are drawn at 4x and downsampled so their edges are anti-aliased like a photo's, not jagged
SUPERSAMPLE = 4

BASE_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "diamond")
HELD_OUT_SHAPES: tuple[str, ...] = ("star", "heart")
ALL_SHAPES: tuple[str, ...] = BASE_SHAPES + HELD_OUT_SHAPES

# saturated, well separated hues: the evaluator must tell them apart on blurry generated samples too
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (130, 50, 170),
    "orange": (245, 135, 30),
}

# the shape's half-extent in pixels at 32 px; the gap between the ranges keeps "small" and "big" unambiguous
SIZES: dict[str, tuple[float, float]] = {"small": (5.0, 8.0), "big": (11.0, 14.0)}

# the shape-colour-size combination whose size no base caption names (see the module docstring)
UNNAMED_LOOK: tuple[str, str, str] = ("diamond", "green", "big")
# share of base training captions that name the size: the rest teach the size-free prompts the evaluator uses
SIZE_NAMED_SHARE = 0.5

Labels = dict[str, str]
Point = tuple[float, float]


def caption(shape: str, colour: str, size: str | None = None) -> str:
    return f"a {size} {colour} {shape}" if size else f"a {colour} {shape}"


def _regular_polygon(cx: float, cy: float, radius: float, corners: int, start_angle: float) -> list[Point]:
    return [(cx + radius * math.sin(start_angle + 2 * math.pi * i / corners),
             cy - radius * math.cos(start_angle + 2 * math.pi * i / corners)) for i in range(corners)]


def _star(cx: float, cy: float, r: float) -> list[Point]:
    points = []
    for i in range(10):
        reach = r if i % 2 == 0 else 0.45 * r
        angle = i * math.pi / 5
        points.append((cx + reach * math.sin(angle), cy - reach * math.cos(angle)))
    return points


def _heart(cx: float, cy: float, r: float) -> list[Point]:
    # the classic parametric heart spans x in [-16, 16] and y in [-17, 12]; scale it into the radius and
    # shift it so its bounding box is centred like the other shapes
    scale = r / 16.5
    points = []
    for i in range(72):
        t = 2 * math.pi * i / 72
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        points.append((cx + scale * x, cy - scale * (y + 2.5)))
    return points


def _paint(canvas: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
           fill: tuple[int, int, int]) -> None:
    if shape == "circle":
        canvas.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        half = 0.85 * r  # a square of half-side r would look much heavier than a circle of radius r
        canvas.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif shape == "triangle":
        # an upward triangle's bounding box sits r/4 above its centroid; shift it down to centre it
        canvas.polygon(_regular_polygon(cx, cy + 0.25 * r, r, 3, 0.0), fill=fill)
    elif shape == "cross":
        arm = 0.33 * r
        canvas.rectangle((cx - r, cy - arm, cx + r, cy + arm), fill=fill)
        canvas.rectangle((cx - arm, cy - r, cx + arm, cy + r), fill=fill)
    elif shape == "ring":
        canvas.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        hole = 0.55 * r
        canvas.ellipse((cx - hole, cy - hole, cx + hole, cy + hole), fill=(255, 255, 255))
    elif shape == "diamond":
        canvas.polygon(_regular_polygon(cx, cy, r, 4, 0.0), fill=fill)
    elif shape == "star":
        canvas.polygon(_star(cx, cy, r), fill=fill)
    elif shape == "heart":
        canvas.polygon(_heart(cx, cy, r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(ALL_SHAPES)}")


def random_placement(size: str, rng: random.Random) -> tuple[Point, float]:
    """((cx, cy), radius) in pixels at 32 px: a radius within `size`'s range and a centre that keeps the shape
    whole. Draws three numbers from `rng` (radius, cx, cy, in that order), as `draw` always has."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; known: {', '.join(SIZES)}")
    radius = rng.uniform(*SIZES[size])
    low, high = radius + 1.0, IMAGE_SIZE - radius - 1.0
    cx, cy = rng.uniform(low, high), rng.uniform(low, high)
    return (cx, cy), radius


def draw_at(shape: str, colour: str, centre: Point, radius: float) -> Image.Image:
    """One shape of `colour` centred at `centre` (pixels at 32 px) with half-extent `radius`: what `draw` draws
    once it has placed the shape, so two images drawn at one placement differ only in shape or colour."""
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; known: {', '.join(COLOURS)}")
    big = IMAGE_SIZE * SUPERSAMPLE
    image = Image.new("RGB", (big, big), "white")
    s = SUPERSAMPLE
    _paint(ImageDraw.Draw(image), shape, centre[0] * s, centre[1] * s, radius * s, COLOURS[colour])
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)


def draw(shape: str, colour: str, size: str, rng: random.Random) -> Image.Image:
    """One shape at a random radius within `size`'s range and a random position that keeps it whole."""
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; known: {', '.join(COLOURS)}")
    centre, radius = random_placement(size, rng)
    return draw_at(shape, colour, centre, radius)


def sample_dataset(n: int, seed: int, shapes: Sequence[str] = BASE_SHAPES,
                   colours: Sequence[str] = tuple(COLOURS), sizes: Sequence[str] = tuple(SIZES),
                   name_sizes: bool = False) -> list[tuple[Image.Image, str, Labels]]:
    """`n` random (image, caption, labels) triples; the same arguments always give the same images.

    With `name_sizes`, about `SIZE_NAMED_SHARE` of the captions name the size, never for `UNNAMED_LOOK`.
    The choice comes from its own generator, so the images are the same either way.
    """
    rng = random.Random(seed)
    naming = random.Random(f"size captions {seed}")
    samples = []
    for _ in range(n):
        shape, colour, size = rng.choice(shapes), rng.choice(colours), rng.choice(sizes)
        image = draw(shape, colour, size, rng)
        named = name_sizes and naming.random() < SIZE_NAMED_SHARE and (shape, colour, size) != UNNAMED_LOOK
        samples.append((image, caption(shape, colour, size if named else None),
                        {"shape": shape, "colour": colour, "size": size}))
    return samples


def to_array(images: Sequence[Image.Image]) -> np.ndarray:
    """Images as one uint8 array (N, H, W, 3), the form the training scripts keep datasets in."""
    return np.stack([np.asarray(image.convert("RGB"), dtype=np.uint8) for image in images])
