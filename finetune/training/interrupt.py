"""Ctrl-C and `kill` (SIGINT, SIGTERM) stop a run at a step boundary, after a checkpoint, instead of losing it:
the handler only records the request; the loop acts on it where the state is whole. A single process stops at
the next step; several processes agree on it only where the loop reads the loss (every `log.every` steps and
before any save), one read point late, so that asking the others never makes a GPU wait."""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Any, Iterator, Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """The run stopped on a signal; `exit_code` is the shell's convention, 128 + the signal's number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopRequest:
    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._agreed: Any = None  # the processes' summed flags of the last read point, on their way to the host

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:  # asked twice: the user means now
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    def seen_here(self, accelerator) -> bool:
        """Whether this run can stop after this step without asking the other processes: a request on a run of
        one process (several learn of it at the next point they all read the loss, `requested_anywhere`)."""
        return self.signum is not None and accelerator.num_processes == 1

    def requested_anywhere(self, accelerator) -> bool:
        """Whether any process was asked to stop, the same answer on every process (all stop at the same step, or
        the others would wait forever); call it at the same points on every process (where the loss is read).
        With several processes the flags are summed by a collective queued on the devices and the sum comes back
        one call late (training/host_copy.py), so asking never makes the host wait for the step just queued: a
        request is acted on at the second read point after it."""
        wanted = self.signum is not None
        if accelerator.num_processes == 1:
            return wanted
        import torch

        from finetune.training.host_copy import LaterOnHost

        flag = accelerator.reduce(torch.tensor([float(wanted)], device=accelerator.device), reduction="sum")
        earlier, self._agreed = self._agreed, LaterOnHost(flag)
        return earlier is not None and float(earlier.value().sum()) > 0


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
