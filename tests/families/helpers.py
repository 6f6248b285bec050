"""What the per-family tests share (no test module imports another): the tiny base loaded as training loads it,
and a hook recording what the transformer is called with."""
from __future__ import annotations

from typing import Any, Iterable

import torch


def loaded_family(folder: Any, **options: Any) -> tuple[Any, Any, Any]:
    """(family, parts, pipeline) for a tiny base folder: the family told from it, its parts loaded with `options`
    (the family's model keys), and the pipeline built on them without a progress bar."""
    from finetune.models import family_for

    family = family_for("auto", str(folder))
    parts = family.load(str(folder), options=family.spec.options(base=str(folder), **options))
    pipe = family.pipeline(parts)
    pipe.set_progress_bar_config(disable=True)
    return family, parts, pipe


def recording(transformer: torch.nn.Module, calls: list, keep: Iterable[str] | None = None) -> Any:
    """A forward pre-hook appending each call's inputs to `calls`, tensors cloned: its keywords (only those in
    `keep`, when given) and a positional first input as `hidden_states`. Returns the hook's handle."""
    keep = set(keep) if keep is not None else None

    def record(module, args, kwargs):
        found = {**({"hidden_states": args[0]} if args else {}), **kwargs}
        calls.append({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in found.items()
                      if keep is None or k in keep})
    return transformer.register_forward_pre_hook(record, with_kwargs=True)
