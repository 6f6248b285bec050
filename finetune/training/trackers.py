"""TensorBoard / Weights & Biases through accelerate's trackers (W&B honours WANDB_MODE=offline)."""
from __future__ import annotations

from typing import Any

import numpy as np


def flat_config(data: dict, prefix: str = "") -> dict[str, Any]:
    """Trackers take scalars only: nested sections become dotted keys, lists and None become text."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def start(accelerator, project: str, run_name: str | None, config: dict, logging_dir: str) -> None:
    if not accelerator.log_with:
        return
    init_kwargs = {"wandb": {"dir": logging_dir, **({"name": run_name} if run_name else {})}}
    # TensorBoard writes under logging_dir/project; W&B files the run under that project
    accelerator.init_trackers(project, config=flat_config(config), init_kwargs=init_kwargs)


def log_images(accelerator, name: str, image, step: int) -> None:
    array = np.asarray(image)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({name: array[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({name: [array]}, step=step)
