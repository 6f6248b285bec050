"""output_dir/history.jsonl: one JSON object per optimizer step, appended and flushed line by line, so a crash
loses at most the line being written; output_dir/run.json: what the run says about itself for its report page
(recipe, plan, data notes, sample-grid labels, state)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from finetune.io.atomic import write_text_atomically

HISTORY = "history.jsonl"
RUN_INFO = "run.json"
# the keys of a history line, in the order they are written
FIELDS = ("step", "loss", "lr", "seconds_per_step", "samples_per_second", "peak_memory_bytes", "elapsed", "time")
# written after them on the lines of the steps that have them (validation.every steps)
OPTIONAL_FIELDS = ("validation_loss", "clip_score", "dino_similarity")


def read_history(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of output_dir/history.jsonl in step order ([] without the file). A line that does not parse
    (the one a crash cut short) is left out; of two records of one step the later wins."""
    path = Path(output_dir) / HISTORY
    if not path.is_file():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]


class History:
    """Appends records to output_dir/history.jsonl. Opening it keeps only the records up to `keep_through`
    (the step a run resumes at; 0 for a new run), so a resumed run neither repeats nor skips a step."""

    def __init__(self, output_dir: str | os.PathLike, keep_through: int):
        self.path = Path(output_dir) / HISTORY
        kept = [r for r in read_history(output_dir) if r["step"] <= keep_through]
        write_text_atomically(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.last = kept[-1] if kept else None
        self._last_start = 0  # where the last line written by this process starts
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (open for the whole run)

    def append(self, record: dict[str, Any]) -> None:
        line = {key: record.get(key) for key in FIELDS}
        line.update({key: record[key] for key in OPTIONAL_FIELDS if record.get(key) is not None})
        self._last_start = self._file.tell()
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()  # in the OS's hands: a crash of this process cannot lose it
        self.last = record

    def amend_last(self, step: int, fields: dict[str, Any]) -> None:
        """Add `fields` (OPTIONAL_FIELDS) to the last line, step `step`'s: figures made after the step's line was
        written (a sample grid's scores). The line is rewritten in place, so each step keeps one line."""
        if self.last is None or self.last.get("step") != step:
            raise ValueError(f"history.jsonl: the last line is not step {step}'s")
        self._file.truncate(self._last_start)
        self.append({**self.last, **fields})

    def close(self) -> None:
        self._file.close()


def read_run_info(output_dir: str | os.PathLike) -> dict[str, Any]:
    """output_dir/run.json, or {} when the run predates it (or it is unreadable)."""
    path = Path(output_dir) / RUN_INFO
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return info if isinstance(info, dict) else {}


def write_run_info(output_dir: str | os.PathLike, info: dict[str, Any]) -> Path:
    return write_text_atomically(Path(output_dir) / RUN_INFO, json.dumps(info, indent=2, default=str))
