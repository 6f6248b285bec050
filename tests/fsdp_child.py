"""`finetune` with accelerate's FSDP kept on CPU processes: a test-only override, never used by the toolkit.

accelerate 1.15 turns an FSDP request into DDP on a CPU (its state.py switches FSDP on only in the GPU branch), so
without this no CPU test could run the loop's FSDP path. With FSDP_ON_CPU=1 the state keeps the FSDP plugin the
config asked for; FSDP2 then shards over gloo as it does over NCCL. Without it, this is plain `python -m finetune`.
  accelerate launch --config_file recipes/accelerate/fsdp_flux.yaml --num_processes 2 tests/fsdp_child.py train ...
"""
from __future__ import annotations

import os
import sys


def keep_fsdp_on_cpu() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            # every later AcceleratorState() copies PartialState's fields over its own
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init


if __name__ == "__main__":
    if os.environ.get("FSDP_ON_CPU") == "1":
        keep_fsdp_on_cpu()
    from finetune.cli import main

    sys.exit(main(sys.argv[1:]))
