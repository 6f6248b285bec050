"""Sample grids on a page: the PNG inlined as a data: URI, each row labelled with its prompt, each column with
the image it holds, small images shown enlarged without smoothing (CSS `image-rendering: pixelated`). The PNG
files on disk are never changed; a grid too heavy to inline whole is inlined as a smaller JPEG copy."""
from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from html import escape
from pathlib import Path

from PIL import Image

SHOWN = 128  # pixels a small image is enlarged to on the page (in whole multiples)
LARGEST = 256  # pixels a large image is shown at
INLINE_LIMIT = 1_500_000  # bytes of PNG inlined as they are; above, a JPEG copy at LARGEST px per image


def data_uri(path: Path, columns: int, rows: int) -> tuple[str, tuple[int, int]]:
    """(data: URI of the grid, its size in pixels as stored)."""
    raw = path.read_bytes()
    with Image.open(io.BytesIO(raw)) as image:
        size = image.size
        if len(raw) <= INLINE_LIMIT:
            return "data:image/png;base64," + base64.b64encode(raw).decode(), size
        cell = max(1, min(size[0] // max(columns, 1), LARGEST))
        small = image.convert("RGB").resize((cell * columns, cell * rows) if size[0] % columns == 0
                                            else (size[0] * LARGEST // max(size), size[1] * LARGEST // max(size)))
        buffer = io.BytesIO()
        small.save(buffer, format="JPEG", quality=88)
        return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode(), size


def shown_cell(pixels: int) -> int:
    """On-page size of one image stored at `pixels`: small ones enlarged by a whole factor, large ones shrunk."""
    if pixels >= LARGEST:
        return LARGEST
    return pixels * max(1, SHOWN // pixels) if pixels else SHOWN


def labelled_grid(path: Path, prompts: Sequence[str], row_notes: Sequence[str], columns: Sequence[str],
                  caption: str, cell: int | None = None, label_column: str = "minmax(8em,16em)",
                  row_heights: Sequence[int] | None = None) -> str:
    """HTML of the grid at `path`: one row per prompt (with its note, e.g. the seed and its own settings) and one
    column per label, each image shown `cell` pixels wide (default: shown_cell). `row_heights`: each row's height
    in the PNG's pixels, for a grid whose prompts drew different sizes (training/sampling.rows_grid: columns as
    wide as the widest image); None: square cells. When the image's shape does not fit the labels (a grid drawn
    with other settings) it is shown unlabelled, with a note saying so."""
    rows, count = len(prompts), len(columns)
    uri, (width, height) = data_uri(path, max(count, 1), max(rows, 1))
    pixels = width // max(count, 1)
    heights = list(row_heights) if row_heights is not None else [pixels] * rows
    fits = (rows > 0 and count > 0 and width % count == 0 and len(heights) == rows and sum(heights) == height
            and (row_heights is not None or height % rows == 0))
    if not fits:
        scale = max(1, SHOWN // max(min(width, height), 1)) if max(width, height) < 4 * SHOWN else 1
        return (f'<figure class="grid"><img class="px" alt="{escape(caption)}" src="{uri}" '
                f'style="width:{width * scale}px"><figcaption>{escape(caption)} (unlabelled: the prompts that drew '
                f'it are not known)</figcaption></figure>')
    cell = cell or shown_cell(pixels)
    smooth = "" if cell > pixels else ' style="image-rendering:auto"'
    shown = [f"{h * cell / pixels:.6g}px" for h in heights]  # each row scaled as its columns are
    row_sizes = f"repeat({rows},{cell}px)" if len(set(heights)) == 1 and heights[0] == pixels else " ".join(shown)
    parts = [(f'<figure class="grid"><figcaption>{escape(caption)}</figcaption><div class="cells" style="grid-template-columns:{label_column} '
             f'repeat({count},{cell}px);grid-template-rows:auto {row_sizes}">'), "<div></div>"]
    parts += [f'<div class="col">{escape(label)}</div>' for label in columns]
    for row, (prompt, note) in enumerate(zip(prompts, row_notes)):
        parts.append(f'<div class="row" style="grid-column:1;grid-row:{row + 2}"><span class="prompt">{escape(prompt or "(empty prompt)")}'
                     f'</span><span class="note">{escape(note)}</span></div>')
    parts.append(f'<img class="px"{smooth} alt="{escape(caption)}" src="{uri}" style="grid-column:2/span {count};'
                 f'grid-row:2/span {rows};width:{cell * count}px;height:{sum(heights) * cell / pixels:.6g}px">')
    parts.append("</div></figure>")
    return "".join(parts)
