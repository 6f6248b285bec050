"""Which distributed engine a run really got, said before the first step. accelerate turns a request it cannot
meet into something else without a word: version 1.15 on a CPU runs an FSDP config as plain DDP (or as one
process), which gives the same numbers and shards nothing, so a run that only looked at its results would never
know. `accelerate launch` passes the config's choice on in the environment (ACCELERATE_USE_FSDP,
ACCELERATE_USE_DEEPSPEED); what the run got is `accelerator.distributed_type`."""
from __future__ import annotations

import os
from typing import Mapping

# environment variable accelerate launch sets -> the DistributedType name it asks for
REQUESTS = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DEEPSPEED"}
NAMES = {"NO": "one process, no distributed engine", "MULTI_CPU": "DDP over CPU processes (gloo)",
         "MULTI_GPU": "DDP over GPUs", "FSDP": "FSDP (parameters sharded)", "DEEPSPEED": "DeepSpeed"}


def requested_engine(environ: Mapping[str, str] = os.environ) -> str | None:
    """The engine the accelerate config asked for (FSDP or DEEPSPEED), or None for DDP / a single process."""
    return next((engine for key, engine in REQUESTS.items() if environ.get(key, "").lower() in ("1", "true")),
                None)


def engine_report(got: str, processes: int, asked: str | None) -> tuple[str, str | None]:
    """(the line saying what the run got, a warning when it is not what was asked for, else None); `got` is
    `accelerator.distributed_type.name`."""
    line = f"engine: {NAMES.get(got, got)}, {processes} process(es)"
    if asked is None or asked == got:
        return line, None
    return line, (f"the accelerate config asks for {asked}, but accelerate gave {NAMES.get(got, got)}: nothing is "
                  f"sharded. {asked} needs GPUs (and a multi-GPU launch); the numbers will be those of plain "
                  "training, with its memory")
