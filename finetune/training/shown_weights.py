"""The weights a run shows and saves: sample grids, snapshots, the final artifact and validation scores.

Methods that keep a second set of the trained weights (train.ema's average, a schedule-free optimizer's averaged
point) each add to `Run.weight_views` a function returning a context manager that puts their weights in place of
the trained ones and the trained ones back on leaving. Checkpoints never go through them: they keep the weights
the optimizer steps, with each method's own state beside them.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Callable, ContextManager, Iterator


@contextmanager
def shown_weights(views: list[Callable[[], ContextManager]]) -> Iterator[None]:
    """Within the context the trained modules hold the weights each of `views` shows, entered in order (none:
    the trained weights as they are)."""
    with ExitStack() as stack:
        for view in views:
            stack.enter_context(view())
        yield
