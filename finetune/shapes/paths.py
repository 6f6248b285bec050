"""Where the shipped shapes-world files (base model, evaluator) live.

They are data, not package code, so they sit in the repository's `data_examples/shapes/`. The package finds
them relative to its own source file, which works from a checkout and from an editable install; any other
install (a wheel) must point `FINETUNE_SHAPES_DATA` at a copy of that folder.
"""
from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "FINETUNE_SHAPES_DATA"


def shapes_data_dir() -> Path:
    configured = os.environ.get(ENV_VAR)
    if configured:
        return Path(configured).expanduser()
    # finetune/shapes/paths.py -> repository root -> data_examples/shapes
    return Path(__file__).resolve().parents[2] / "data_examples" / "shapes"


def _existing(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(
            f"the shipped shapes-world {what} is not at {path}; run from a checkout of the repository "
            f"(or an editable install of it), or set {ENV_VAR} to a copy of data_examples/shapes")
    return path


def default_base_path() -> Path:
    return _existing(shapes_data_dir() / "base", "base model")


# the shipped bases by name: the U-Net (a tiny SD 1.x) and the transformer (a tiny SD3, flow matching)
SHIPPED_BASES = {"unet": "base", "transformer": "transformer_base"}


def base_path(name_or_path: str | Path | None) -> Path:
    """A shipped base by name (unet, transformer; None: unet), or any other folder as given."""
    if name_or_path is None or str(name_or_path) in SHIPPED_BASES:
        folder = SHIPPED_BASES[str(name_or_path or "unet")]
        return _existing(shapes_data_dir() / folder, f"{name_or_path or 'unet'} base model")
    return Path(name_or_path)


def default_evaluator_path() -> Path:
    return _existing(shapes_data_dir() / "evaluator.safetensors", "evaluator")
