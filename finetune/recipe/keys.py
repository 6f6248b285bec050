"""How a recipe key is declared: its default, its help text and its bounds, on the field itself.

    rank: int = key(4, "adapter rank: the inner width of each LoRA pair; oft: the block size", minimum=1)

The help text is what the recipe reference (docs/recipes.md, `finetune validate --keys`) shows; the bounds are
checked in one place (`out_of_bounds`, called by finetune/recipe/typed.py for every key a recipe sets), so that a
recipe with `data.repeats: 0` is refused the same way as every other key out of its range.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

_NO_DEFAULT = dataclasses.MISSING


def key(default: Any = _NO_DEFAULT, help: str = "", *, factory: Optional[Callable[[], Any]] = None,
        minimum: Optional[float] = None, maximum: Optional[float] = None, above: Optional[float] = None,
        below: Optional[float] = None, hint: str = "", path: bool = False) -> Any:
    """A recipe key: `default` (or `factory` for a list or mapping), one or two sentences of `help`, and bounds a
    number must keep: `minimum`/`maximum` inclusive, `above`/`below` exclusive (`above=0`: positive). `hint` is
    added to a bounds message ("8 is usual"); `path` marks a file or folder resolved against the recipe's folder."""
    metadata: dict[str, Any] = {"help": help}
    for name, value in (("minimum", minimum), ("maximum", maximum), ("above", above), ("below", below)):
        if value is not None:
            metadata[name] = value
    if hint:
        metadata["hint"] = hint
    if path:
        metadata["path"] = True
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def required(help: str = "", path: bool = False) -> Any:
    """A key with no default: `load` reports it as missing when the recipe leaves it out."""
    metadata: dict[str, Any] = {"required": True, "help": help}
    if path:
        metadata["path"] = True
    return dataclasses.field(default=None, metadata=metadata)


def help_of(field: dataclasses.Field) -> str:
    """The field's help text, or the empty string."""
    return str(field.metadata.get("help", ""))


def bounds_text(field: dataclasses.Field) -> str:
    """The field's bounds in words ("at least 1", "between 0 and 1", "positive"), or the empty string."""
    m = field.metadata
    low = (f"at least {_number(m['minimum'])}" if "minimum" in m else
           ("positive" if m.get("above") == 0 else f"above {_number(m['above'])}") if "above" in m else "")
    high = (f"at most {_number(m['maximum'])}" if "maximum" in m else
            f"below {_number(m['below'])}" if "below" in m else "")
    if "minimum" in m and "maximum" in m:
        return f"between {_number(m['minimum'])} and {_number(m['maximum'])}"
    return " and ".join(part for part in (low, high) if part)


def out_of_bounds(field: dataclasses.Field, value: Any, path: str) -> Optional[str]:
    """"path: must be at least 1, got 0" when a number `value` breaks the field's bounds (NaN and infinity break
    any bounds); None otherwise (and for None, lists and anything not a number: a list's items are not bounded
    here)."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    m = field.metadata
    if not any(name in m for name in ("minimum", "maximum", "above", "below")):
        return None
    # YAML reads .nan and .inf too: no bounded key means either (a NaN passes every comparison)
    broken = (not math.isfinite(value) or ("minimum" in m and value < m["minimum"])
              or ("maximum" in m and value > m["maximum"])
              or ("above" in m and value <= m["above"]) or ("below" in m and value >= m["below"]))
    if not broken:
        return None
    hint = f" ({m['hint']})" if m.get("hint") else ""
    finite = "" if math.isfinite(value) else " and finite"
    return f"{path}: must be {bounds_text(field)}{finite}{hint}, got {value}"


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
