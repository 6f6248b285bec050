"""Draw the tiny example edit pairs in data_examples/star_edit: five purple stars (control/, what the edit starts
from) and the same stars in gold (images/, the targets), captioned with the instruction "make the star gold". The
pairs the edit recipes (recipes/flux_kontext_lora.yaml, recipes/flux2_edit_lora.yaml) point at; the same placements
as data_examples/star.

Run `python data_examples/make_star_edit.py` to redraw them; the output is deterministic.
"""
from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_star import PLACEMENTS, SIZE, star  # noqa: E402  (the example concept's stars)

HERE = Path(__file__).resolve().parent / "star_edit"
COLOURS = {"control": (128, 40, 170), "images": (212, 160, 23)}  # purple before, gold after
INSTRUCTION = "make the star gold"


def main() -> None:
    for folder, colour in COLOURS.items():
        (HERE / folder).mkdir(parents=True, exist_ok=True)
        for i, (cx, cy, radius, rotation) in enumerate(PLACEMENTS):
            # drawn at 4x and downsampled for smooth edges, as make_star.py draws
            image = Image.new("RGB", (SIZE * 4, SIZE * 4), "white")
            ImageDraw.Draw(image).polygon(star(cx * 4, cy * 4, radius * 4, rotation), fill=colour)
            image.resize((SIZE, SIZE), Image.Resampling.LANCZOS).save(HERE / folder / f"star_{i}.png", optimize=True)
    for i in range(len(PLACEMENTS)):
        (HERE / "images" / f"star_{i}.txt").write_text(INSTRUCTION + "\n")


if __name__ == "__main__":
    main()
