"""Sample prompts with their own settings: `sample.prompts` (strings, or mappings {prompt, negative_prompt, seed,
steps, guidance, width, height, control_image}) or `sample.prompt_file`, a prompt file as kohya's sd-scripts reads
it (`control_image`, an edit model's control image or images: training/control_images.py):

- `.txt`: one prompt per line, settings as flags after it: `--n` negative prompt, `--w` width, `--h` height,
  `--d` seed, `--s` steps, `--l` guidance scale (`--g`, kohya's embedded guidance for Flux, is the same one value
  here and wins over `--l`); lines starting with `#` and blank lines are skipped. kohya's other flags (`--ss`
  sampler, `--cn` ControlNet image, `--ctr`/`--rcfg` Lumina's CFG truncation and renormalisation, `--fs` flow
  shift) have no counterpart here: each is ignored with a note. Any other flag is refused (a typo trains a run
  whose grids silently ignore it).
- `.toml`: a `[prompt]` table of defaults and its `[[prompt.subset]]` entries, each a mapping; `.json`: a list of
  strings (lines as above) or mappings. Mappings take this module's keys or kohya's (`sample_steps`, `scale`,
  `guidance_scale`).

What a key does not say comes from the recipe: sample.negative_prompt, sample.steps, sample.guidance_scale,
data.resolution, and sample.seed + the prompt's index as the seed (so a grid's rows differ and every grid of a
run draws from the same seeds).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.training.control_images import KEY as CONTROL_KEY, anchored, control_paths, count_problems

KEYS = ("prompt", "negative_prompt", "seed", "steps", "guidance", "width", "height", CONTROL_KEY)
KOHYA_KEYS = {"sample_steps": "steps", "scale": "guidance", "guidance_scale": "guidance"}
FLAGS = {"n": "negative_prompt", "w": "width", "h": "height", "d": "seed", "s": "steps", "l": "guidance",
         "g": "guidance"}
IGNORED_FLAGS = {"ss": "the sampler (the pipeline's own scheduler draws)", "cn": "a ControlNet image",
                 "ctr": "Lumina's CFG truncation", "rcfg": "Lumina's CFG renormalisation",
                 "fs": "the flow shift (the base's scheduler config sets it)"}
SUFFIXES = (".txt", ".toml", ".json")


class PromptProblem(ValueError):
    """A prompt entry or prompt file that cannot be drawn; the message names where and how to fix it."""


@dataclass(frozen=True)
class SamplePrompt:
    """One row of a sample grid: every setting resolved (width and height in pixels)."""
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance: float
    width: int
    height: int
    control_images: tuple[str, ...] = ()  # an edit model's control images, one path per control slot


@dataclass(frozen=True)
class Defaults:
    """What a prompt that does not say takes (the recipe's sample section and data.resolution)."""
    negative_prompt: str
    seed: int  # the first row's; row i draws from seed + i
    steps: int
    guidance: float
    width: int
    height: int


def parse_line(line: str, where: str) -> tuple[dict[str, Any], list[str]]:
    """A kohya prompt line -> ({key: value}, notes on flags ignored). kohya splits at " --", so a prompt may hold
    "--" only without a space before it. Raises PromptProblem for an unknown flag or a value of the wrong type."""
    prompt, *flags = line.split(" --")
    entry: dict[str, Any] = {"prompt": prompt.strip()}
    notes, given = [], {}
    for flag in flags:
        name, _, value = flag.strip().partition(" ")
        name, value = name.lower(), value.strip()
        if name in IGNORED_FLAGS:
            notes.append(f"{where}: --{name} ({IGNORED_FLAGS[name]}) is not used here; ignored")
        elif name not in FLAGS:
            raise PromptProblem(f"{where}: unknown flag --{name}; the flags read are "
                                f"{', '.join('--' + f for f in FLAGS)} (and kohya's {', '.join(IGNORED_FLAGS)}, ignored)")
        elif FLAGS[name] == "negative_prompt":
            entry["negative_prompt"] = value
        else:
            try:
                given[name] = float(value) if FLAGS[name] == "guidance" else int(value)
            except ValueError:
                kind = "a number" if FLAGS[name] == "guidance" else "a whole number"
                raise PromptProblem(f"{where}: --{name} takes {kind} ({FLAGS[name]}), got {value!r}") from None
    if "g" in given and "l" in given and given["g"] != given["l"]:
        notes.append(f"{where}: --l {given['l']:g} ignored: one guidance value per prompt here, --g's (the "
                     "pipeline's guidance argument: embedded guidance on Flux, CFG scale elsewhere)")
    for name in ("w", "h", "d", "s", "l", "g"):  # --g last: it wins over --l
        if name in given:
            entry[FLAGS[name]] = given[name]
    return entry, notes


def read_prompt_file(path: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The entries of a prompt file (.txt, .toml or .json as kohya reads them) and notes on flags ignored.
    Raises PromptProblem naming the file for a missing, unreadable or malformed one."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise PromptProblem(f"sample.prompt_file: {path} should end in {', '.join(SUFFIXES)} (kohya's formats)")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PromptProblem(f"sample.prompt_file: {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptProblem(f"sample.prompt_file: {path} cannot be read as UTF-8 text ({exc})") from None
    if path.suffix.lower() == ".txt":
        raw: list[Any] = [(line.strip(), f"{path}:{number}") for number, line in enumerate(text.splitlines(), 1)
                          if line.strip() and not line.startswith("#")]
    else:
        raw = [(item, f"{path} entry {index + 1}") for index, item in enumerate(_structured(path, text))]
    entries, notes = [], []
    for item, where in raw:
        entry, item_notes = parse_line(item, where) if isinstance(item, str) else (item, [])
        if isinstance(entry, dict) and CONTROL_KEY in entry:  # relative to the prompt file, as a recipe's paths are
            entry = {**entry, CONTROL_KEY: anchored(entry[CONTROL_KEY], path.parent)}
        entries.append({"_where": where, **entry})
        notes += item_notes
    if not entries:
        raise PromptProblem(f"sample.prompt_file: {path} holds no prompt")
    return entries, notes


def _structured(path: Path, text: str) -> list[Any]:
    """A .toml's [prompt] defaults merged into each [[prompt.subset]] entry (kohya's layout), or a .json list."""
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
            if not isinstance(data, list):
                raise ValueError("the file should hold a list of prompts (strings or mappings)")
            return data
        import tomllib

        table = tomllib.loads(text).get("prompt")
        if not isinstance(table, dict) or not isinstance(table.get("subset"), list):
            raise ValueError("expected a [prompt] table with [[prompt.subset]] entries, as kohya reads")
        shared = {key: value for key, value in table.items() if key != "subset"}
        return [{**shared, **subset} for subset in table["subset"]]
    except ValueError as exc:  # json.JSONDecodeError and tomllib.TOMLDecodeError are ValueErrors
        raise PromptProblem(f"sample.prompt_file: {path} is not a prompt file kohya would read: {exc}") from None


def prompt_entries(prompts: list[Any], prompt_file: str | None) -> tuple[list[dict[str, Any]], list[str]]:
    """The recipe's sample prompts as mappings (each with `_where`, naming it for messages), and notes."""
    if prompts and prompt_file:
        raise PromptProblem("sample.prompts and sample.prompt_file are both given; keep one (set sample.prompts: [] "
                            "to draw the file's prompts)")
    if prompt_file:
        return read_prompt_file(prompt_file)
    return [{"_where": f"sample.prompts[{i}]", **(p if isinstance(p, dict) else {"prompt": p})}
            for i, p in enumerate(prompts)], []


def resolve(entries: list[dict[str, Any]], defaults: Defaults) -> list[SamplePrompt]:
    """Each entry with what it does not say taken from `defaults`. Raises PromptProblem naming the entry, its
    unknown key (with the valid ones) or the value of the wrong type or range."""
    rows = []
    for index, raw in enumerate(entries):
        where = raw.get("_where", f"prompt {index + 1}")
        entry = {KOHYA_KEYS.get(key, key): value for key, value in raw.items() if key != "_where"}
        unknown = sorted(set(entry) - set(KEYS))
        if unknown:
            raise PromptProblem(f"{where}: unknown key {', '.join(unknown)}; the keys are {', '.join(KEYS)}")
        if not isinstance(entry.get("prompt"), str):
            raise PromptProblem(f"{where}: needs `prompt`, a string (got {entry.get('prompt')!r})")
        controls = entry.pop(CONTROL_KEY, None)
        values = {"negative_prompt": defaults.negative_prompt, "seed": defaults.seed + index, "steps": defaults.steps,
                  "guidance": defaults.guidance, "width": defaults.width, "height": defaults.height, **entry}
        _check_types(values, where)
        try:
            values["control_images"] = control_paths(controls) if controls is not None else ()
        except ValueError as exc:
            raise PromptProblem(f"{where}: {exc}") from None
        rows.append(SamplePrompt(**{**values, "guidance": float(values["guidance"])}))
    return rows


def _check_types(values: dict[str, Any], where: str) -> None:
    if not isinstance(values["negative_prompt"], str):
        raise PromptProblem(f"{where}: negative_prompt should be a string, got {values['negative_prompt']!r}")
    for key, least in (("seed", 0), ("steps", 1), ("width", 1), ("height", 1)):
        value = values[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise PromptProblem(f"{where}: {key} should be a whole number of at least {least}, got {value!r}")
    guidance = values["guidance"]
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not (math.isfinite(guidance)
                                                                                   and guidance >= 0):
        raise PromptProblem(f"{where}: guidance should be a number of 0 or more, got {guidance!r}")


def size_problems(rows: list[SamplePrompt], entries: list[dict[str, Any]], factor: int, why: str) -> list[str]:
    """One problem per row whose width or height is no multiple of `factor` (the VAE's downsampling; `why` says
    where the figure comes from), naming the entry and the nearest sizes that fit."""
    problems = []
    for row, entry in zip(rows, entries):
        for key in ("width", "height"):
            side = getattr(row, key)
            if side % factor:
                fit = max(factor, round(side / factor) * factor)
                problems.append(f"{entry.get('_where', 'a sample prompt')}: {key} {side} must be a multiple of "
                                f"{factor} ({why}); try {fit}")
    return problems


def row_note(row: SamplePrompt, defaults: Defaults) -> str:
    """A grid row's label: its seed, and each setting that differs from the recipe's ("seed 3 · 40 steps ·
    guidance 4 · 512x768 · negative: blurry")."""
    parts = [f"seed {row.seed}"]
    if row.steps != defaults.steps:
        parts.append(f"{row.steps} steps")
    if row.guidance != defaults.guidance:
        parts.append(f"guidance {row.guidance:g}")
    if (row.width, row.height) != (defaults.width, defaults.height):
        parts.append(f"{row.width}x{row.height}")
    if row.negative_prompt != defaults.negative_prompt:
        parts.append(f"negative: {row.negative_prompt or '(none)'}")
    if row.control_images:
        parts.append(f"control: {', '.join(Path(p).name for p in row.control_images)}")
    return " · ".join(parts)


def summary_line(rows: list[SamplePrompt], defaults: Defaults, source: str | None) -> str:
    """The run summary's line on sample grids: how many prompts, from where, how many with their own settings."""
    own = sum(row != SamplePrompt(row.prompt, defaults.negative_prompt, defaults.seed + i, defaults.steps,
                                  defaults.guidance, defaults.width, defaults.height) for i, row in enumerate(rows))
    sizes = sorted({(row.width, row.height) for row in rows})
    controlled = sum(bool(row.control_images) for row in rows)
    return (f"samples: {len(rows)} prompt(s) from {source or 'sample.prompts'}, {own} with settings of their own"
            + (f", {controlled} with control images" if controlled else "")
            + f"; sizes {', '.join(f'{w}x{h}' for w, h in sizes)}")


def defaults_of(sample, resolution: int) -> Defaults:
    """The recipe's sample settings (`sample`: SampleOptions) as the defaults of its prompts, square at
    `resolution` (data.resolution)."""
    return Defaults(negative_prompt=sample.negative_prompt, seed=sample.seed, steps=sample.steps,
                    guidance=sample.guidance_scale, width=resolution, height=resolution)


def checked_prompts(sample, resolution: int, factor: int, why: str, family: Any = None
                    ) -> tuple[list[SamplePrompt], list[str], list[str]]:
    """(rows, notes, problems) of the recipe's sample section (`sample`: SampleOptions): its prompts or prompt
    file resolved against its settings, sizes checked against `factor` (the VAE's downsampling, `why` naming
    where that figure comes from), control images against what `family` takes (when it is known). Never raises:
    `finetune validate` lists the problems with the recipe's others, setup raises them as a RecipeError."""
    try:
        entries, notes = prompt_entries(sample.prompts, sample.prompt_file)
    except PromptProblem as exc:
        return [], [], [str(exc)]
    controls = count_problems(entries, family) if family is not None else []
    try:
        rows = resolve(entries, defaults_of(sample, resolution))
    except PromptProblem as exc:
        return [], [], [*controls, str(exc)]
    return rows, notes, [*controls, *size_problems(rows, entries, factor, why)]


def prompts_for_run(recipe, factor: int | None, say) -> tuple[SamplePrompt, ...]:
    """The grid's rows for a run that samples (none when sample.every is 0), checked against the loaded VAE's
    downsampling `factor` (a hub base's is known only now); says the summary line and notes. Raises RecipeError."""
    from finetune.recipe.load import RecipeError

    sample = recipe.sample
    if sample.every <= 0:
        return ()
    rows, notes, problems = checked_prompts(sample, recipe.data.resolution, factor or 8,
                                            f"this base's VAE downsamples by {factor or 8}")
    if problems:
        raise RecipeError(recipe.source, problems)
    say("\n".join([summary_line(rows, defaults_of(sample, recipe.data.resolution), sample.prompt_file), *notes]))
    return tuple(rows)


def sample_prompt_lines(recipe) -> list[str]:
    """What `finetune validate` says of the sample grids (the recipe passed its checks): the summary line and
    notes on kohya flags ignored; nothing when the run draws no grid."""
    sample, resolution = recipe.sample, recipe.data.resolution
    if sample.every <= 0:
        return []
    rows, notes, _ = checked_prompts(sample, resolution, 1, "")
    return [summary_line(rows, defaults_of(sample, resolution), sample.prompt_file), *(f"note: {n}" for n in notes)]


def grid_labels(rows: tuple[SamplePrompt, ...], defaults: Defaults) -> dict[str, list]:
    """What the report labels a grid's rows with (run.json's `samples`): each row's prompt, its note (row_note),
    its height in pixels (rows of different sizes are of different heights), and how many control-image columns
    come before the results (training/control_images.with_controls)."""
    return {"prompts": [row.prompt for row in rows], "notes": [row_note(row, defaults) for row in rows],
            "heights": [row.height for row in rows],
            "controls": max((len(row.control_images) for row in rows), default=0)}
