"""Draw the tiny example concept in data_examples/star: five purple stars, captioned "a purple sks".

Run `python data_examples/make_star.py` to redraw them; the output is deterministic.
"""
from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent / "star"
SIZE = 64


def star(cx: float, cy: float, radius: float, rotation: float) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        r = radius if i % 2 == 0 else radius * 0.45
        angle = rotation + i * math.pi / 5
        points.append((cx + r * math.sin(angle), cy - r * math.cos(angle)))
    return points


# (centre x, centre y, radius, rotation) of each star, in 64 px image coordinates
PLACEMENTS = [(32, 32, 24, 0.0), (26, 30, 18, 0.2), (38, 36, 20, -0.15), (30, 38, 16, 0.4), (34, 28, 26, 0.1)]


def main() -> None:
    HERE.mkdir(exist_ok=True)
    for i, (cx, cy, radius, rotation) in enumerate(PLACEMENTS):
        # drawn at 4x and downsampled for smooth edges
        image = Image.new("RGB", (SIZE * 4, SIZE * 4), "white")
        ImageDraw.Draw(image).polygon(star(cx * 4, cy * 4, radius * 4, rotation), fill=(128, 40, 170))
        image.resize((SIZE, SIZE), Image.Resampling.LANCZOS).save(HERE / f"star_{i}.png", optimize=True)
        (HERE / f"star_{i}.txt").write_text("a purple sks\n")


if __name__ == "__main__":
    main()
