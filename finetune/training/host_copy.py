"""A device tensor's value brought to the host later, without making the host wait for work queued after it.

`LaterOnHost(tensor)` queues a copy into pinned (page-locked) host memory behind the work that makes `tensor`, and
records a CUDA event there; `value()` waits for that event alone. Read one step late, the step it belongs to is
done by then while the device runs the next one, so the host never stalls the device. On a CPU the tensor is
already on the host and is kept as it is.
"""
from __future__ import annotations

from typing import Any

import torch


class LaterOnHost:
    def __init__(self, tensor: torch.Tensor) -> None:
        self.event: Any = None
        if tensor.device.type == "cuda":
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host.copy_(tensor.detach(), non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
            tensor = host
        self.tensor = tensor.detach()

    def value(self) -> torch.Tensor:
        """The tensor on the host (waiting for the work that made it, not for any queued later)."""
        if self.event is not None:
            self.event.synchronize()
        return self.tensor
