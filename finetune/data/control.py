"""Edit models' paired data (`data.control`): each training image, the target of an edit, with its control images,
found by name and proven readable before any model loads.

Two sources, exactly one per recipe (the recipe checks refuse both or neither):
- `folders`: each folder gives one control slot. A training image's control image is found as data/masks.py finds a
  mask: by the image's path relative to data.images with any image suffix (`sub/img1.jpg` -> `FOLDER/sub/img1.png`),
  else by its file name's stem at the folder's top (`FOLDER/img1.png`, musubi-tuner's and ai-toolkit's flat layout).
  A folder with several references per image numbers them from 0 (`img1_0.png`, `img1_1.png`), one slot each, in
  that order. A file in a control folder that no training image claims is refused: misnamed, it would train
  nothing, in silence (ai-toolkit's "missing control images" names no file; here every one is named).
- `column`: a metadata.jsonl field (a path relative to data.images) or a dataset column (an image, a path, or
  datasets' undecoded {"bytes", "path"}), or a list of them, one per slot.

Every sample carries as many control images as the others (a batch stacks each slot), at most as many as the family
takes (`FamilySpec.control_images`: `slot_problem`). Everything wrong is collected into one DataError. How each
control image is sized (`resize: target` or `bucket`) and placed is in finetune/data/control_sizes.py.
"""
from __future__ import annotations

import io
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image

from finetune.data.images import open_image, probe_size, to_rgb
from finetune.data.masks import image_index
from finetune.data.sources import IMAGE_SUFFIXES, ControlImage, DataError, Example, some

_NUMBERED = re.compile(r"^(.*)_(\d+)$")  # img1_0 -> (img1, 0): one of several references per image


class ControlProblem(ValueError):
    """One training image's control images cannot serve; the text names the files and what is wrong."""


def attach_controls(examples: list[Example], control: Any, images_folder: str | None, dataset: str | None,
                    decode: bool) -> None:
    """Give each example its control images (`Example.controls`, one per slot), each readable: decoded whole
    (`decode`, as training does) or its header read (`finetune validate`). `control`: data.control (None: none).
    Raises DataError naming every training image without its control images, every control image without a
    training image, every unreadable one and every sample whose count differs from the others'."""
    if control is None:
        return
    root = Path(os.path.expanduser(images_folder)) if images_folder else None
    if control.folders:
        problems = _pair_folders(examples, [Path(os.path.expanduser(f)) for f in control.folders], root, decode)
        fix = ("give every training image its control image in each of data.control.folders, named as the image "
               "(any image suffix; several references as NAME_0, NAME_1, ...), and move out the control images that "
               "no training image has")
    else:
        base = root if root is not None else (Path(dataset) if dataset and os.path.isdir(dataset) else None)
        problems = _pair_column(examples, control.column, base, decode)
        fix = (f"give every image a readable control image in its {control.column!r} "
               + ("field (a path relative to data.images, or a list of them)" if root else "column")
               + ", the same number for every image")
    problems += _uneven(examples)
    if problems:
        raise DataError(f"data.control: {len(problems)} problem(s) with the control images: "
                        f"{some(problems, separator='; ')}. Fix: {fix}")


def slot_problem(slots: int | None, spec: Any) -> str | None:
    """Why `spec`'s family cannot train on samples of `slots` control images each (None: not counted yet) (None: it
    can): it takes none (the message names the edit families, from the registry), or fewer."""
    if spec.control_images == 0:
        from finetune.models import specs

        edit = [name for name, other in specs().items() if other.control_images > 0]
        given = f" ({slots} per sample)" if slots else ""
        return (f"model.family {spec.name} takes no control images ({spec.title} is not an edit model), and "
                f"data.control gives them{given}; edit families: {', '.join(edit) or 'none yet'}. Set model.family "
                "to one of them, or remove data.control")
    if slots is not None and slots > spec.control_images:
        return (f"data.control: every sample has {slots} control images, and {spec.title} takes at most "
                f"{spec.control_images}; give each image at most {spec.control_images} (fewer folders or references)")
    return None


def slots_of(examples: list[Example]) -> int:
    """Control images per sample (0 without data.control)."""
    return len(examples[0].controls or []) if examples else 0


def summary_line(examples: list[Example], control: Any) -> str | None:
    """The run summary's and `finetune validate`'s line on the pairs (None without data.control)."""
    if control is None:
        return None
    slots = slots_of(examples)
    source = (f"from {', '.join(control.folders)}" if control.folders else f"from the {control.column!r} column")
    sized = ("each at its target's size, cropped and flipped with it" if control.resize == "target" else
             f"each in its own bucket at {control.resolution or 'data.resolution'} px, flipped with its target")
    return (f"control images: {len(examples)} pair(s), {slots} control image{'s' if slots > 1 else ''} each "
            f"({source}; {sized})")


def _pair_folders(examples: list[Example], folders: list[Path], root: Path | None, decode: bool) -> list[str]:
    problems, claimed = [], set()
    indexes = [_FolderIndex(folder) for folder in folders]
    trained = _image_keys(root)
    for example in examples:
        found = []
        try:
            for index in indexes:
                found += index.references(_relative(Path(example.name), root), example.name, trained)
        except ControlProblem as exc:
            problems.append(str(exc))
            continue
        claimed.update(found)
        controls = _readable_all(found, example.name, decode, problems)
        if controls is not None:
            example.controls = controls
    for index in indexes:
        problems += [f"{path}: no training image {stem}.* in data.images"
                     for path, stem in index.orphans(claimed, trained)]
    return problems


def _relative(image: Path, root: Path | None) -> Path:
    """The training image's path relative to data.images without suffix (its stem alone outside it)."""
    try:
        return image.relative_to(root).with_suffix("") if root else Path(image.stem)
    except ValueError:  # a metadata.jsonl file_name reaching out of the folder
        return Path(image.stem)


def _image_keys(root: Path | None) -> tuple[set[str], set[str]]:
    """Every image file under data.images by relative path without suffix, and by stem: the training images a
    control image may belong to (an unreadable one skipped by data.on_bad_image: skip included)."""
    paths, stems = set(), set()
    if root is not None:
        for key in image_index(root):
            paths.add(key)
            stems.add(key.rsplit("/", 1)[-1])
    return paths, stems


class _FolderIndex:
    """A control folder's images by relative path without suffix, and the numbered ones by their base."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.exact = image_index(folder)
        self.numbered: dict[str, dict[int, list[Path]]] = {}
        for key, paths in self.exact.items():
            match = _NUMBERED.match(key)
            if match:
                self.numbered.setdefault(match.group(1), {})[int(match.group(2))] = paths

    def references(self, relative: Path, image: str, trained: tuple[set[str], set[str]]) -> list[Path]:
        """The control images of the training image at `relative` (mirrored path first, then its stem at the
        top), in slot order. Raises ControlProblem when there are none, or several for one slot."""
        for key in dict.fromkeys((relative.as_posix(), relative.name)):
            exact, numbered = self.exact.get(key, []), self.numbered.get(key, {})
            if len(exact) > 1:
                raise ControlProblem(f"{image}: several control images match it in {self.folder} "
                                     f"({', '.join(p.name for p in exact)}); keep one")
            if exact and numbered and not _is_trained(f"{key}_0", trained):
                raise ControlProblem(f"{image}: {self.folder} holds both {exact[0].name} and numbered references "
                                     f"({', '.join(p.name for n in sorted(numbered) for p in numbered[n])}); keep "
                                     "the one control image, or number them all from 0")
            if exact:
                return exact
            if numbered:
                return self._numbered(key, numbered, image)
        raise ControlProblem(f"{image}: no control image {relative.as_posix()}.* (or {relative.name}_0.*, "
                             f"{relative.name}_1.*, ... for several) in {self.folder}")

    def _numbered(self, key: str, numbered: dict[int, list[Path]], image: str) -> list[Path]:
        numbers = sorted(numbered)
        if numbers != list(range(len(numbers))):
            raise ControlProblem(f"{image}: its references in {self.folder} are numbered {numbers}; number them "
                                 f"from 0 without gaps ({key}_0, {key}_1, ...)")
        several = [p.name for n in numbers if len(numbered[n]) > 1 for p in numbered[n]]
        if several:
            raise ControlProblem(f"{image}: several files for one reference in {self.folder} "
                                 f"({', '.join(several)}); keep one of each number")
        return [numbered[n][0] for n in numbers]

    def orphans(self, claimed: set[Path], trained: tuple[set[str], set[str]]) -> list[tuple[Path, str]]:
        """(file, the stem looked for) of every control image no training image claims and none could."""
        found = []
        for key, paths in self.exact.items():
            match = _NUMBERED.match(key)
            owners = [key] + ([match.group(1)] if match else [])
            if any(_is_trained(owner, trained) for owner in owners):
                continue  # its image exists: unreadable and skipped, or left out of metadata.jsonl
            found += [(path, (match.group(1) if match else key)) for path in paths if path not in claimed]
        return found


def _is_trained(key: str, trained: tuple[set[str], set[str]]) -> bool:
    """Whether an image under data.images has this control key: by its path, or at a control folder's top (no
    folder in the key) by its stem alone."""
    paths, stems = trained
    return key in paths or ("/" not in key and key in stems)


def _readable_all(paths: list[Path], owner: str, decode: bool, problems: list[str]) -> list[ControlImage] | None:
    controls = []
    for path in paths:
        try:
            controls.append(_readable(path, owner, decode))
        except ControlProblem as exc:
            problems.append(str(exc))
    return controls if len(controls) == len(paths) else None


def _readable(path: Path, owner: str, decode: bool) -> ControlImage:
    try:
        size = open_image(str(path)).size if decode else probe_size(str(path))
    except Exception as exc:  # PIL raises many types for broken files
        raise ControlProblem(f"{path} (control of {owner}) cannot be read ({type(exc).__name__}: {exc})") from None
    return ControlImage(str(path), lambda p=str(path): open_image(p), size)


def _pair_column(examples: list[Example], column: str, base: Path | None, decode: bool) -> list[str]:
    problems = []
    for example in examples:
        if example.field is None:
            problems.append(f"{example.name}: no metadata.jsonl line to read {column!r} from (data.control.column "
                            "reads a metadata.jsonl field or a dataset column; use data.control.folders)")
            continue
        try:
            values = _listed(example.field(column))
        except KeyError as exc:
            problems.append(f"{example.name}: {exc.args[0]}")
            continue
        if not values:
            problems.append(f"{example.name}: no control image (its {column!r} is empty)")
            continue
        controls = []
        for slot, value in enumerate(values):
            try:
                controls.append(_column_image(example, column, slot, value, base, decode))
            except ControlProblem as exc:
                problems.append(str(exc))
        if len(controls) == len(values):
            example.controls = controls
    return problems


def _listed(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _column_image(example: Example, column: str, slot: int, value: Any, base: Path | None,
                  decode: bool) -> ControlImage:
    path = value.get("path") if isinstance(value, dict) and not value.get("bytes") else value
    if isinstance(path, (str, os.PathLike)):
        file = Path(os.path.expanduser(path))
        file = base / file if base is not None and not file.is_absolute() else file
        if not file.is_file():
            raise ControlProblem(f"{example.name}: its control image {path} is not there ({file})")
        if file.suffix.lower() not in IMAGE_SUFFIXES:
            raise ControlProblem(f"{example.name}: its control image {file} is not an image file "
                                 f"({', '.join(sorted(IMAGE_SUFFIXES))})")
        return _readable(file, example.name, decode)
    name = f"{example.name}.{column}[{slot}]"

    def load() -> Image.Image:  # read again from its row each time: a dataset's images stay out of memory
        return _decoded(_listed(example.field(column))[slot])

    try:
        size = load().size
    except Exception as exc:
        raise ControlProblem(f"{name} (control of {example.name}) cannot be read ({type(exc).__name__}: {exc})") \
            from None
    return ControlImage(name, load, size)


def _decoded(value: Any) -> Image.Image:
    if isinstance(value, Image.Image):
        return to_rgb(value)
    if isinstance(value, dict) and value.get("bytes"):
        with Image.open(io.BytesIO(value["bytes"])) as image:
            image.load()
            return to_rgb(image)
    raise TypeError(f"neither an image nor a path: {type(value).__name__}")


def _uneven(examples: list[Example]) -> list[str]:
    """A problem per sample whose count of control images is not the most common one."""
    counts = Counter(len(e.controls) for e in examples if e.controls)
    if len(counts) <= 1:
        return []
    usual, how_many = counts.most_common(1)[0]
    return [f"{e.name} has {len(e.controls)} control image(s) ({', '.join(Path(c.name).name for c in e.controls)}) "
            f"where {how_many} other image(s) have {usual}"
            for e in examples if e.controls and len(e.controls) != usual]
