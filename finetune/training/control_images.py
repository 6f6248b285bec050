"""Control images in sample grids (edit models): a `sample.prompts` mapping's `control_image` (one path, or a list
with one path per control slot of the family) and `finetune sample --control`. Checked before any model loads
(the files read, their count against the family's `control_images`), handed to the pipeline through the family's
`sample_kwargs`, and shown in the grid before each row's results.

A control image goes to the pipeline as the file holds it, in RGB: the pipelines round its sides down to a multiple
of 16 px (Flux.2's caps its area at 1 MP and refuses sides under 64 px); give control images of the size the
model was trained with."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from PIL import Image

KEY = "control_image"  # the sample.prompts mapping key (the recipe's interface, issue 38)


def control_paths(value: Any) -> tuple[str, ...]:
    """A `control_image` value as paths: a path, or a non-empty list of paths, each an image file PIL reads.
    Raises ValueError saying what is wrong with it and what to give."""
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
        raise ValueError(f"{KEY} should be an image file's path or a list of paths (one per control image), got "
                         f"{value!r}")
    for path in paths:
        file = Path(path).expanduser()
        if not file.is_file():
            raise ValueError(f"{KEY}: {path} does not exist; give the path of an image file (relative paths are "
                             "read from the working directory)")
        try:
            with Image.open(file) as image:
                image.verify()
        except (OSError, SyntaxError) as exc:  # PIL's UnidentifiedImageError is an OSError; a cut file may be either
            raise ValueError(f"{KEY}: {path} is not an image PIL can read ({exc}); give a PNG, JPEG or WebP "
                             "file") from None
    return tuple(paths)


def anchored(value: Any, folder: Path) -> Any:
    """A `control_image` value with each relative path made absolute against `folder` (a recipe's folder, a prompt
    file's), as a recipe's other paths are (finetune/recipe/paths.py); a value of another type is left for
    `control_paths` to refuse."""
    def one(path: Any) -> Any:
        if not isinstance(path, str) or not path:
            return path
        expanded = Path(path).expanduser()
        return str(expanded if expanded.is_absolute() else (folder / expanded).resolve())

    return [one(path) for path in value] if isinstance(value, list) else one(value)


def count_problems(entries: Iterable[dict[str, Any]], family: Any) -> list[str]:
    """One problem per prompt entry (mappings with `_where`) holding more control images than the family takes
    (its spec's control_images; 0: no edit model), naming the entry and the fix. Entries whose value is not a path
    or a list are left to `control_paths`."""
    problems = []
    taken = family.control_images
    for index, entry in enumerate(entries):
        value = entry.get(KEY)
        count = 1 if isinstance(value, str) else len(value) if isinstance(value, list) else 0
        if count <= taken:
            continue
        where = entry.get("_where", f"prompt {index + 1}")
        if taken == 0:
            problems.append(f"{where}: {KEY}: {family.title} ({family.name}) is no edit model and takes no control "
                            f"image; remove {KEY}, or sample an edit model (a family that takes control images: "
                            f"{', '.join(edit_families())})")
        else:
            problems.append(f"{where}: {KEY}: {family.title} takes at most {taken} control image(s) per prompt, got "
                            f"{count}; give at most {taken}")
    return problems


def with_given_controls(entries: list[dict[str, Any]], given: Optional[list[str]], option: str
                        ) -> list[dict[str, Any]]:
    """Prompt entries, each without a control_image of its own given the control images `given` on the command
    line (`option`: each value one path or a comma list, in order), every entry's control images checked
    (`control_paths`). Raises ValueError naming the entry (or `option`) and the fix."""
    paths = [path.strip() for value in given or [] for path in value.split(",") if path.strip()]
    merged = []
    for entry in entries:
        own = KEY in entry
        entry = entry if own or not paths else {**entry, KEY: paths}
        if KEY in entry:
            try:
                control_paths(entry[KEY])
            except ValueError as exc:
                where = entry.get("_where", "a prompt") if own else option
                raise ValueError(f"{where}: {exc}") from None
        merged.append(entry)
    return merged


def control_problems(recipe, family: Any) -> list[str]:
    """The recipe's sample prompts holding more control images than `family` takes (any for a family that is no
    edit model), checked once the family is told, before its base loads (a hub id's family is told only then);
    every other prompt problem is sample_prompts.checked_prompts'."""
    from finetune.training.sample_prompts import PromptProblem, prompt_entries

    if recipe.sample.every <= 0:
        return []
    try:
        entries, _ = prompt_entries(recipe.sample.prompts, recipe.sample.prompt_file)
    except PromptProblem:
        return []
    return count_problems(entries, family)


def edit_families() -> list[str]:
    """The registered families that take control images, by model.family name."""
    from finetune.models import specs

    return [name for name, spec in specs().items() if spec.control_images]


def load_control_images(paths: Sequence[str]) -> list[Image.Image]:
    """The control images of one grid row, in RGB, as the files hold them."""
    images = []
    for path in paths:
        with Image.open(Path(path).expanduser()) as image:
            images.append(image.convert("RGB"))
    return images


def with_controls(drawn: list[list[Image.Image]], control_paths_per_row: Sequence[Sequence[str]]
                  ) -> list[list[Optional[Image.Image]]]:
    """Each grid row's images after its control images, each shrunk (aspect kept) to fit the row's first image;
    a row with fewer control images than another gets empty cells (None) in their place, so the results stay in
    the same columns. Rows without any control image come back as they are when no row has one."""
    columns = max((len(paths) for paths in control_paths_per_row), default=0)
    if columns == 0:
        return drawn
    rows = []
    for images, paths in zip(drawn, control_paths_per_row):
        box = images[0].size
        shown = []
        for control in load_control_images(paths):
            control.thumbnail(box)  # never enlarged: a small control image stays as it is
            shown.append(control)
        rows.append([*shown, *([None] * (columns - len(shown))), *images])
    return rows
