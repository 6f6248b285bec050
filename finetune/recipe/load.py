"""Read a YAML recipe, apply command-line overrides, and check the whole of it before any model loads."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Iterable

import yaml

from finetune.recipe import checks
from finetune.recipe.paths import resolve_paths
from finetune.recipe.schema import ModelOptions, Recipe, StrategyOptions
from finetune.recipe.typed import build, closest, yaml_keys
from finetune.strategies import KINDS, options_class


# keys an older finetune read, and where they live now (refused with their new name)
MOVED = {"flow": "model.flow", "train.min_snr_gamma": "model.min_snr_gamma",
         "train.noise_offset": "model.noise_offset"}


class RecipeError(ValueError):
    """Every problem found in a recipe, reported together."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {count} in the recipe:\n{lines}")


def load_recipe(path: str | os.PathLike, overrides: Iterable[str] = ()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(str(path), [f"recipe file not found: {path}"])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise RecipeError(str(path), [f"not valid YAML: {exc}"]) from None
    if data is None:
        data = {}
    problems: list[str] = []
    for item in overrides if isinstance(data, dict) else ():  # a non-mapping recipe is reported below
        apply_override(data, item, problems)
    if problems:
        raise RecipeError(str(path), problems)
    command_line_keys = {item.partition("=")[0].strip() for item in overrides}
    recipe = parse_recipe(data, source=str(path), base_dir=path.parent, command_line_keys=command_line_keys)
    recipe.overrides = list(overrides)
    return recipe


def apply_override(data: Any, item: str, problems: list[str]) -> None:
    """`train.max_steps=10` sets data["train"]["max_steps"] = 10 (the value is read as YAML)."""
    if "=" not in item:
        problems.append(f"override {item!r}: expected dotted.key=value, e.g. train.max_steps=100")
        return
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {} if node.get(part) is None else node[part]
        if not isinstance(node[part], dict):
            problems.append(f"override {item!r}: {part} is not a section")
            return
        node = node[part]
    try:
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as exc:
        problems.append(f"override {item!r}: value is not valid YAML ({exc})")


def parse_recipe(data: Any, source: str = "<recipe>", base_dir: Path | None = None,
                 command_line_keys: set[str] = frozenset()) -> Recipe:
    """Build and check a Recipe; raise RecipeError naming every problem.

    With `base_dir` (the recipe file's folder), relative paths become absolute as finetune/recipe/paths.py says:
    those written in the file against `base_dir`, those in `command_line_keys` against the working directory.
    Without it they stay as given (relative to the working directory).
    """
    problems: list[str] = []
    if not isinstance(data, dict):
        raise RecipeError(source, ["the recipe must be a mapping of sections (model:, strategy:, data:, ...)"])
    problems += moved_keys(data)
    data = _older_values(data)
    strategy_raw, model_raw = data.get("strategy"), data.get("model")
    data = {k: v for k, v in data.items() if k not in ("strategy", "model", "flow")}
    if isinstance(data.get("train"), dict):  # a moved key is reported once, above
        data["train"] = {k: v for k, v in data["train"].items() if f"train.{k}" not in MOVED}
    recipe = build(Recipe, {**data, "strategy": {}, "model": {}}, "", problems)
    strategy = _build_strategy(strategy_raw, problems)
    model = build_model(model_raw, problems)
    if recipe is not None:
        recipe.strategy = strategy
        recipe.model = model
        recipe.source = source
        _require(recipe, problems)
        if base_dir is not None:
            resolve_paths(recipe, base_dir, command_line_keys)
        if strategy is not None and model is not None:
            problems.extend(checks.check(recipe))
    if problems:
        raise RecipeError(source, problems)
    return recipe


def _build_strategy(raw: Any, problems: list[str]) -> StrategyOptions | None:
    if raw is None:
        problems.append(f"strategy: missing section (strategy.kind is one of: {', '.join(KINDS)})")
        return None
    if not isinstance(raw, dict):
        problems.append("strategy: expected a mapping with at least `kind:`")
        return None
    kind = raw.get("kind")
    if kind not in KINDS:
        guess = closest(str(kind), list(KINDS))
        hint = f"; did you mean '{guess}'?" if guess else ""
        problems.append(f"strategy.kind: {kind!r} is not one of {', '.join(KINDS)}{hint}")
        return None
    return build(options_class(kind), raw, "strategy", problems)


# values an older finetune wrote that now have a name: (section, key) -> {old value: new value}
OLDER_VALUES = {("train", "compile"): {True: "full"}}


def _older_values(data: dict) -> dict:
    """`data` with each older value (OLDER_VALUES) replaced by its name; the caller's dict is left as it was."""
    for (section, key), names in OLDER_VALUES.items():
        holder = data.get(section)
        if isinstance(holder, dict) and isinstance(holder.get(key), bool) and holder[key] in names:
            data = {**data, section: {**holder, key: names[holder[key]]}}
    return data


def moved_keys(data: dict) -> list[str]:
    """A problem for each key an older finetune read that now lives elsewhere, naming its new place."""
    found = []
    for old, new in MOVED.items():
        section, _, key = old.partition(".")
        holder = data.get(section) if key else data
        if isinstance(holder, dict) and (key or section) in holder:
            found.append(f"{old}: moved to {new} (the model family's options live in the model section); "
                         f"write it there")
    return found


def build_model(raw: Any, problems: list[str]) -> ModelOptions | None:
    """The `model` section as its family's options class (model.family, or the family `auto` tells from
    model.base before loading: sd when nothing tells); a key of another family is named with its family."""
    from finetune.models import DEFAULT_FAMILY, spec_of, specs, told_family
    from finetune.models.detect import UnsupportedFamily
    from finetune.file_errors import FileProblem

    if raw is None:
        problems.append("model: missing section (model.base is required)")
        return None
    if not isinstance(raw, dict):
        problems.append(f"model: expected a mapping of keys (base:, family:, ...), got {type(raw).__name__}")
        return None
    name = raw.get("family", "auto")
    if name != "auto":
        try:
            spec_of(str(name))
        except ValueError as exc:
            problems.append(f"model.family: {exc}")
            return None
    told = name
    if name == "auto":
        try:
            told = told_family(str(raw.get("base") or ""))
        except (UnsupportedFamily, FileProblem):  # the model checks name it; its options cannot be told
            told = DEFAULT_FAMILY
    own = set(yaml_keys(spec_of(told).options))
    elsewhere = {key: [spec.name for spec in specs().values() if key in yaml_keys(spec.options)]
                 for key in raw if key not in own}
    for key, families in elsewhere.items():
        if families:
            how = "model.family says" if name != "auto" else "model.family: auto tells from model.base"
            problems.append(f"model.{key}: an option of model.family {' / '.join(families)}, and this model is "
                            f"{told} ({how}); remove it, or set model.family")
    return build(spec_of(told).options, {k: v for k, v in raw.items() if not elsewhere.get(k)}, "model", problems)


def options_for(spec: Any, model: ModelOptions) -> ModelOptions:
    """`model` as `spec`'s options: itself, or, when loading told another family than the recipe was read with
    (model.family: auto and a hub id), the common keys carried over. Raises RecipeError when it set keys of the
    family it was read as, which the family it is does not read."""
    if type(model) is spec.options:
        return model
    common = {f.name for f in dataclasses.fields(ModelOptions)}
    default = type(model)()
    lost = [f.name for f in dataclasses.fields(model) if f.name not in common
            and getattr(model, f.name) != getattr(default, f.name) and f.name not in yaml_keys(spec.options)]
    if lost:
        raise RecipeError("model", [f"model.{key}: model.family: auto read the recipe before {model.base} was "
                                    f"found to be a {spec.title} model, which has no such option; set model.family: "
                                    f"{spec.name} and write that family's options" for key in lost])
    carried = {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.name in yaml_keys(spec.options)}
    return spec.options(**carried)


def _require(recipe: Recipe, problems: list[str]) -> None:
    for section_name, section in [("", recipe)] + [
        (f.name, getattr(recipe, f.name)) for f in dataclasses.fields(recipe)
        if dataclasses.is_dataclass(getattr(recipe, f.name, None))
    ]:
        if section is None:
            continue
        for f in dataclasses.fields(section):
            if f.metadata.get("required") and getattr(section, f.name) is None:
                problems.append(f"{section_name + '.' if section_name else ''}{f.name}: required, but missing")


def recipe_to_dict(recipe: Recipe) -> dict:
    """The recipe as plain data (what goes into checkpoints and artifact metadata)."""
    out = dataclasses.asdict(recipe)
    out.pop("source", None)
    out.pop("overrides", None)  # already applied: the values above are the resolved ones
    return out
