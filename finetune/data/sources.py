"""Find the training examples a recipe names, and prove each one readable before any model loads.

Sources: an image folder with caption sidecars, the same with a `metadata.jsonl`, or a Hugging Face
`datasets` dataset (hub name or a `save_to_disk` folder); `data.prompt` gives every image one caption.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from finetune.data.images import open_image, probe_size, to_rgb

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def some(names: list[str], limit: int = 5, separator: str = ", ") -> str:
    """The first `limit` names, and how many more: enough to find the files without flooding the message."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return separator.join(names[:limit]) + more


class DataError(ValueError):
    """A problem with the training data, named precisely enough to fix."""


@dataclass
class Example:
    name: str  # file path or "dataset[row]", for messages
    caption: str
    load: Callable[[], Image.Image]  # returns upright RGB
    size: tuple[int, int] | None = None  # (width, height), known once the image has been read
    repeats: int = 1  # times per epoch, times data.repeats (kohya's `10_name` folders give 10)
    probe: Callable[[], tuple[int, int]] | None = None  # the upright size without decoding (None: decode to see)
    mask: Callable[[], Image.Image] | None = None  # its loss mask, upright "L" at its size (data/masks.py)
    # another field of its metadata.jsonl line or dataset row by name (KeyError naming the fields there); None for
    # an image of a folder without metadata.jsonl. data.control.column reads control images through it
    field: Callable[[str], Any] | None = None
    controls: list[ControlImage] | None = None  # its control images, one per slot (data/control.py)


@dataclass
class ControlImage:
    """One control (reference) image of an example: what edit families see beside the caption."""

    name: str  # file path, or "dataset[row].column[i]" for an image held in a dataset, for messages
    load: Callable[[], Image.Image]  # returns upright RGB
    size: tuple[int, int]  # upright (width, height), read when the pair was checked


def list_examples(images: str | None, dataset: str | None, *, prompt: str | None, caption_extension: str,
                  split: str, image_column: str, caption_column: str, on_bad_image: str,
                  decode: bool = True) -> list[Example]:
    """Every example, each proven readable: decoded whole (`decode`, as training does, so a truncated file fails
    before any model loads) or its header read (`finetune validate`: fast for thousands of images)."""
    if images is not None:
        examples = _from_folder(Path(os.path.expanduser(images)), prompt, caption_extension, caption_column)
    else:
        examples = _from_dataset(dataset, split, image_column, caption_column, prompt)
    _check_captions(examples)
    return _check_readable(examples, on_bad_image, decode)


def _check_captions(examples: list[Example]) -> None:
    """An empty caption is nearly always a captioner that failed or a file saved blank; trained on, it teaches
    the unconditional prediction. Empty captions on purpose are data.caption_dropout's job."""
    empty = [e.name for e in examples if not e.caption]
    if empty:
        raise DataError(
            f"{len(empty)} image(s) have an empty caption: {some(empty)}. Write their captions, or set data.prompt to "
            "give every image the same one (data.caption_dropout trains on empty captions on purpose)")


# kohya's folder layout: `<repeats>_<text>`, e.g. `10_circle`: its images repeat 10 times per epoch, and `circle`
# is the caption of an image without a caption file (kohya's class tokens)
_KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")


def _from_folder(folder: Path, prompt: str | None, caption_extension: str, caption_column: str) -> list[Example]:
    """Every image in `folder` and its subfolders, at any depth (sorted; hidden folders, named `.xxx`, are left
    out and said so); kohya-named subfolders give their images repeats and a fallback caption."""
    metadata = folder / "metadata.jsonl"
    if metadata.is_file():
        return _from_metadata(folder, metadata, prompt, caption_column)
    examples, missing, looked = [], [], []
    for directory, names in _walk(folder):
        looked.append(directory)
        repeats, class_text = _kohya_folder(directory, folder)
        for path in (directory / name for name in names if Path(name).suffix.lower() in IMAGE_SUFFIXES):
            sidecar = path.with_suffix(caption_extension)
            if prompt is not None:
                caption = prompt
            elif sidecar.is_file():
                caption = _read_caption(sidecar)
            elif class_text is not None:
                caption = class_text
            else:
                missing.append(str(path.relative_to(folder)))
                continue
            examples.append(Example(str(path), caption, lambda p=str(path): open_image(p), repeats=repeats,
                                    probe=lambda p=str(path): probe_size(p)))
    if not examples and not missing:
        where = folder if len(looked) == 1 else f"{folder} or its {len(looked) - 1} subfolder(s)"
        raise DataError(f"data.images: no images in {where} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    if missing:
        raise DataError(
            f"data.images: {len(missing)} image(s) in {folder} have no {caption_extension} caption file: "
            f"{some(missing)}. Add the caption files, name their folder kohya's way (`10_a red circle`: "
            "10 repeats, that caption), or set data.prompt to give every image the same caption")
    return examples


def _walk(folder: Path) -> list[tuple[Path, list[str]]]:
    """(directory, its file names) for `folder` and every subfolder, sorted so the order never depends on the file
    system; hidden folders are skipped with a message, never silently."""
    found = []
    for directory, subfolders, files in os.walk(folder):
        hidden = sorted(name for name in subfolders if name.startswith("."))
        if hidden:
            log.info("data.images: left out hidden folder(s) %s in %s", ", ".join(hidden), directory)
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        found.append((Path(directory), sorted(files)))
    return found


def _kohya_folder(directory: Path, root: Path) -> tuple[int, str | None]:
    """(repeats, fallback caption) from the nearest kohya-named folder between `root` and `directory`."""
    for part in reversed(directory.relative_to(root).parts):
        match = _KOHYA_FOLDER.match(part)
        if match:
            return max(1, int(match.group(1))), match.group(2).strip()
    return 1, None


def _read_caption(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig").strip()  # -sig: drop a Windows byte-order mark
    except UnicodeDecodeError:
        raise DataError(f"caption file {path} is not UTF-8 text; re-save it as UTF-8") from None


def _from_metadata(folder: Path, metadata: Path, prompt: str | None, caption_column: str) -> list[Example]:
    examples = []
    try:
        lines = metadata.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{metadata} is not UTF-8 text; re-save it as UTF-8") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{metadata}, line {number}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or "file_name" not in row:
            raise DataError(f"{metadata}, line {number}: needs a \"file_name\" field")
        if prompt is None and caption_column not in row:
            raise DataError(f"{metadata}, line {number}: no {caption_column!r} caption field "
                            f"(set data.caption_column, or data.prompt for one caption for all)")
        path = folder / row["file_name"]
        if not path.is_file():
            raise DataError(f"{metadata}, line {number}: file {row['file_name']} not found in {folder}")
        caption = prompt if prompt is not None else str(row[caption_column]).strip()
        examples.append(Example(str(path), caption, lambda p=str(path): open_image(p),
                                probe=lambda p=str(path): probe_size(p), field=_row_field(row, metadata)))
    if not examples:
        raise DataError(f"{metadata} lists no images")
    return examples


def _from_dataset(name: str, split: str, image_column: str, caption_column: str,
                  prompt: str | None) -> list[Example]:
    import datasets

    if os.path.isdir(name):
        loaded: Any = datasets.load_from_disk(name)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"data.split: {split!r} not in {name} (splits: {', '.join(loaded)})")
            loaded = loaded[split]
    else:
        try:
            loaded = datasets.load_dataset(name, split=split)
        except (ConnectionError, FileNotFoundError) as exc:  # offline, a typo, a private dataset (DatasetNotFoundError)
            raise DataError(f"data.dataset: {name!r} could not be loaded ({exc}). Check the name on the Hugging Face "
                            "hub and your connection (HF_HUB_OFFLINE=1 reads only what is cached), or give a "
                            "save_to_disk folder, or a folder of images as data.images") from None
    columns = loaded.column_names
    for key, column in (("image_column", image_column), ("caption_column", caption_column)):
        if column not in columns and not (key == "caption_column" and prompt is not None):
            raise DataError(f"data.{key}: no column {column!r} in {name} (columns: {', '.join(columns)})")
    captions = [prompt] * len(loaded) if prompt is not None else [str(c).strip() for c in loaded[caption_column]]
    images = loaded.select_columns([image_column])

    def loader(row: int) -> Callable[[], Image.Image]:
        def load() -> Image.Image:
            value = images[row][image_column]
            return to_rgb(value) if isinstance(value, Image.Image) else open_image(value)
        return load

    views: dict[str, Any] = {}

    def field(row: int) -> Callable[[str], Any]:
        def value(column: str) -> Any:
            if column not in columns:
                raise KeyError(f"no column {column!r} in {name} (columns: {', '.join(columns)})")
            if column not in views:  # one column read at a time: a row's other images stay undecoded
                views[column] = loaded.select_columns([column])
            return views[column][row][column]
        return value

    return [Example(f"{name}[{row}]", captions[row], loader(row), field=field(row)) for row in range(len(loaded))]


def _row_field(row: dict, metadata: Path) -> Callable[[str], Any]:
    def value(name: str) -> Any:
        if name not in row:
            raise KeyError(f"no {name!r} field on its line of {metadata} (fields: {', '.join(row)})")
        return row[name]
    return value


def _check_readable(examples: list[Example], on_bad_image: str, decode: bool) -> list[Example]:
    good, bad = [], []
    for example in examples:
        try:
            example.size = example.probe() if example.probe is not None and not decode else example.load().size
            good.append(example)
        except Exception as exc:  # PIL raises many types for broken files
            bad.append(f"{example.name} ({type(exc).__name__}: {exc})")
    if bad and on_bad_image == "error":
        raise DataError(
            f"{len(bad)} unreadable image(s): {some(bad, separator='; ')}"
            + ". Remove or replace them, or set data.on_bad_image: skip to train without them"
        )
    for item in bad:
        log.warning("skipping unreadable image %s", item)
    if not good:
        raise DataError("no readable images left to train on")
    return good


def tag_frequency(captions: list[str]) -> dict[str, int]:
    """How often each comma-separated tag occurs in the captions (the tag lists UIs show for a LoRA)."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in (part.strip() for part in caption.split(",")):
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return dict(sorted(counts.items()))


def data_name(images: str | None, dataset: str | None) -> str:
    """A short name for the training data: the image folder's name, or the dataset's."""
    return Path(images).name if images else str(dataset)
