"""Ctrl-C and `kill` (SIGINT, SIGTERM) stop a run at the next step boundary, after a checkpoint, instead of
losing it: the handler only records the request; the loop acts on it where the state is whole."""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Iterator, Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """The run stopped on a signal; `exit_code` is the shell's convention, 128 + the signal's number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopRequest:
    def __init__(self) -> None:
        self.signum: Optional[int] = None

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:  # asked twice: the user means now
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    def requested_anywhere(self, accelerator) -> bool:
        """Whether any process was asked to stop: all stop at the same step, or the others would wait forever."""
        wanted = self.signum is not None
        if accelerator.num_processes > 1:
            import torch

            flag = torch.tensor([float(wanted)], device=accelerator.device)
            wanted = bool(accelerator.reduce(flag, reduction="sum").item() > 0)
        return wanted


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Within the context SIGINT/SIGTERM set `request.signum`; the previous handlers come back after it.
    Outside the main thread (where Python cannot install handlers) the request simply never fires."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {signum: signal.signal(signum, request._handle) for signum in SIGNALS}
    try:
        yield request
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
