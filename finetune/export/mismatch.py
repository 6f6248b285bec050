"""Say which layer of an adapter file does not fit the base it is loaded into, instead of torch's stack trace."""
from __future__ import annotations

import re

_TORCH_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+?): copying a param with shape torch\.Size\(\[([^\]]*)\]\) from checkpoint, "
    r"the shape in current model is torch\.Size\(\[([^\]]*)\]\)")


def another_base_error(exc: Exception, source: str) -> ValueError | None:
    """The message for torch's "size mismatch" RuntimeError (None for any other error): the first layer that
    does not fit, its shape in the file and in the model."""
    found = _TORCH_SIZE_MISMATCH.findall(str(exc))
    if not found and "size mismatch" not in str(exc):
        return None
    detail = (f"{found[0][0]} is [{found[0][1]}] in the file but [{found[0][2]}] in this model"
              + (f" ({len(found) - 1} more layers differ too)" if len(found) > 1 else "")) if found else str(exc)
    return ValueError(f"{source}: made for another base model: its weights do not fit this one ({detail}). Load "
                      f"it into the base it was trained on (`finetune inspect {source}` shows what its header says)")
