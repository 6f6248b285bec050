"""Turn plain YAML data into the recipe dataclasses, collecting every problem instead of stopping at the first."""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union

from finetune.recipe.keys import out_of_bounds

_NONE = type(None)


def yaml_keys(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


def closest(name: str, candidates: list[str]) -> str | None:
    found = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return found[0] if found else None


def build(cls: type, data: Any, where: str, errors: list[str]) -> Any:
    """Instantiate dataclass `cls` from mapping `data`; append "key: problem" strings to `errors`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        errors.append(f"{where or 'recipe'}: expected a mapping of keys, got {_describe(data)}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    valid = yaml_keys(cls)
    values: dict[str, Any] = {}
    for key, raw in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in valid:
            guess = closest(str(key), valid)
            hint = f"; did you mean '{where + '.' if where else ''}{guess}'?" if guess else ""
            errors.append(f"{path}: unknown key{hint} (valid keys: {', '.join(valid)})")
            continue
        ok, value = convert(hints[key], raw, path, errors)
        if ok:
            values[key] = value
            outside = out_of_bounds(fields[key], value, path)
            if outside:
                errors.append(outside)
    for f in dataclasses.fields(cls):
        if f.name in values or f.metadata.get("internal"):
            continue
        if dataclasses.is_dataclass(hints[f.name]) and f.default is dataclasses.MISSING \
                and f.default_factory is dataclasses.MISSING:
            path = f"{where}.{f.name}" if where else f.name
            errors.append(f"{path}: missing section")
    try:
        return cls(**values)
    except TypeError:
        return None  # a required section was missing; already reported


def convert(hint: Any, raw: Any, path: str, errors: list[str]) -> tuple[bool, Any]:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if raw is None and _NONE in args:
            return True, None
        inner = [a for a in args if a is not _NONE]
        return convert(inner[0] if len(inner) == 1 else Union[tuple(inner)], raw, path, errors)
    if origin is Literal:
        if isinstance(raw, bool):
            # YAML 1.1 reads a bare no/off/false (yes/on/true) as a boolean: take the choice it was spelled as
            spelled = [word for word in (("yes", "on", "true") if raw else ("no", "off", "false")) if word in args]
            if spelled:
                return True, spelled[0]
        if raw in args:
            return True, raw
        choices = ", ".join(repr(a) for a in args)
        guess = closest(str(raw), [str(a) for a in args])
        hint_text = f"; did you mean '{guess}'?" if guess else ""
        errors.append(f"{path}: {raw!r} is not one of {choices}{hint_text}")
        return False, None
    if origin is list:
        if not isinstance(raw, list):
            raw = [raw] if isinstance(raw, str) else raw
        if not isinstance(raw, list):
            errors.append(f"{path}: expected a list, got {_describe(raw)}")
            return False, None
        out, ok = [], True
        for i, item in enumerate(raw):
            item_ok, value = convert(args[0], item, f"{path}[{i}]", errors)
            ok &= item_ok
            out.append(value)
        return ok, out
    if dataclasses.is_dataclass(hint):
        value = build(hint, raw, path, errors)
        return value is not None, value
    return _scalar(hint, raw, path, errors)


def _scalar(hint: Any, raw: Any, path: str, errors: list[str]) -> tuple[bool, Any]:
    if hint is Any:
        return True, raw
    if hint is bool:
        if isinstance(raw, bool):
            return True, raw
    elif hint is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return True, raw
        if isinstance(raw, float) and raw.is_integer():
            return True, int(raw)
    elif hint is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return True, float(raw)
        # YAML 1.1 reads "1e-4" (no dot) as a string; accept it as the number the user meant
        if isinstance(raw, str):
            try:
                return True, float(raw)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(raw, str):
            return True, raw
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return True, str(raw)
    else:
        return True, raw
    errors.append(f"{path}: expected {_type_name(hint)}, got {_describe(raw)}")
    return False, None


def _type_name(hint: Any) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _describe(raw: Any) -> str:
    if raw is None:
        return "nothing (null)"
    if isinstance(raw, dict):
        return "a mapping"
    if isinstance(raw, list):
        return "a list"
    return f"{type(raw).__name__} {raw!r}"
