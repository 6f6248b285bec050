"""What the training loop tells the report while it runs: a history line per step, the run's notes in
run.json, and report.html rewritten at the start, at every checkpoint and sample step, every REWRITE_SECONDS
between them, and at the end (or when it stops)."""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch

from finetune.file_errors import FileProblem
from finetune.report.history import History, read_run_info, write_run_info
from finetune.report.sources import EVAL_DIR

log = logging.getLogger(__name__)
# the page reloads itself every REFRESH_SECONDS (30): rewriting it (and run.json) at that pace keeps it current
# whatever the recipe samples: the page's charts cost 0.2-0.8 s (a loaded 2-core CPU) every 30 s, not every step
REWRITE_SECONDS = 30.0


def peak_memory(device: torch.device) -> int | None:
    """Bytes of the device's peak allocation so far (torch's max_memory_allocated), None where the device
    reports none (a CPU, MPS)."""
    backend = getattr(torch, device.type, None) if device.type in ("cuda", "xpu") else None
    reader = getattr(backend, "max_memory_allocated", None)
    return int(reader(device)) if reader is not None else None


class LiveReport:
    """Used by the loop on every process; only the main process writes.

    `first_step`: where this session starts (a resume's step); `plan`, `notes`: the lines the run printed before
    its first step (data, length, what trains) and what it said about the data (captions cut)."""

    def __init__(self, accelerator, recipe, output_dir: Path, first_step: int, plan: list[str], notes: list[str]):
        from finetune.recipe.load import recipe_to_dict

        t = recipe.train
        self.output_dir, self.enabled, self.device = output_dir, accelerator.is_main_process, accelerator.device
        self.effective_batch = t.batch_size * accelerator.num_processes * t.gradient_accumulation_steps
        self._started_step, self._failed = time.perf_counter(), set()
        self._ended: dict[int, dict] = {}  # step -> its time and memory, until its loss is read
        if not self.enabled:
            return
        try:
            self.history = History(output_dir, keep_through=first_step)
        except (OSError, FileProblem) as exc:  # the run's own saves say more about an unwritable folder; it goes on
            log.warning(f"could not write {output_dir / 'history.jsonl'} ({exc}); no report for this run")
            self.enabled = False
            return
        if first_step == 0:  # figures of an artifact this run replaces (--overwrite) would be shown as its own
            shutil.rmtree(output_dir / EVAL_DIR, ignore_errors=True)
        earlier = read_run_info(output_dir) if first_step else {}
        self._elapsed_before = float((self.history.last or {}).get("elapsed") or 0.0)
        self._session = time.time()
        samples = {name: labels for name, labels in earlier.get("samples", {}).items()
                   if _step_of(name) <= first_step}  # grids past the resumed step are drawn again
        self.info = {"recipe": recipe_to_dict(recipe), "plan": plan, "notes": notes, "max_steps": t.max_steps,
                     "effective_batch": self.effective_batch, "device": str(self.device),
                     "started": earlier.get("started", self._session), "state": "running", "samples": samples}
        self._write()

    def start_step(self) -> None:
        """Called as a step begins: seconds per step count the step alone, not the saves between steps."""
        self._started_step = time.perf_counter()

    def end_step(self, step: int) -> None:
        """Called as step `step` ends: its time and memory, kept for `record`, which the loop calls later, when it
        reads the loss (training/loop.py reads it every log.every steps, not at each step)."""
        if not self.enabled:
            return
        seconds = time.perf_counter() - self._started_step
        now = time.time()
        self._ended[step] = {
            "seconds_per_step": round(seconds, 4),
            "samples_per_second": round(self.effective_batch / seconds, 3) if seconds > 0 else None,
            "peak_memory_bytes": peak_memory(self.device),
            "elapsed": round(self._elapsed_before + now - self._session, 2), "time": round(now, 2)}

    def record(self, step: int, loss: float, lr: float, checkpoint: bool = False,
               validation_loss: float | None = None) -> None:
        """The step's history line (its time and memory as end_step saw them, or as they are now, and its
        validation score where one was made); the page and run.json too at a checkpoint (`checkpoint`), a
        validation score, or when REWRITE_SECONDS have passed since they were last written."""
        if not self.enabled:
            return
        if step not in self._ended:
            self.end_step(step)
        scored = {"validation_loss": validation_loss} if validation_loss is not None else {}
        self._safely("history.jsonl", self.history.append, {"step": step, "loss": loss, "lr": lr,
                                                            **self._ended.pop(step), **scored})
        if checkpoint or scored or time.monotonic() - self._written >= REWRITE_SECONDS:
            self._write()

    def sampled(self, step: int, rows: dict[str, list], scores: dict[str, float] | None = None) -> None:
        """A sample grid was written for `step`: what it shows is kept (for its labels: `rows`,
        training/sample_prompts.grid_labels), its `scores` (training/grid_scores.py) added to the step's history
        line, and the page rewritten."""
        if not self.enabled:
            return
        if scores:
            self._safely("history.jsonl", self.history.amend_last, step, scores)
        sample = self.info["recipe"]["sample"]
        self.info["samples"][f"step-{step:06d}.png"] = {
            **rows, "seed": sample["seed"], "images_per_prompt": sample["images_per_prompt"]}
        self._write()

    def finish(self) -> None:
        self._end("finished", None)

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if error is not None:
            self._end("stopped", str(error).strip().splitlines()[0] if str(error).strip() else kind.__name__)

    def _end(self, state: str, reason: str | None) -> None:
        if not self.enabled:
            return
        # safely: when the disk is full, the error that stopped the run is the one to show, not closing's
        self._safely("history.jsonl", self.history.close)
        self.info.update(state=state, reason=reason, ended=time.time())
        self._write()

    def _write(self) -> None:
        from finetune.report.page import write_report

        self.info["updated"], self._written = time.time(), time.monotonic()
        self._safely("run.json", write_run_info, self.output_dir, self.info)
        self._safely("report.html", write_report, self.output_dir)

    def _safely(self, what: str, write, *args) -> None:
        # the report is for watching: a failure to write it (a full disk) is said once and never stops training
        try:
            write(*args)
        except Exception as exc:  # noqa: BLE001
            if what not in self._failed:
                self._failed.add(what)
                log.warning(f"could not write {self.output_dir / what} ({exc}); training goes on without it")


def _step_of(name: str) -> int:
    digits = "".join(c for c in name if c.isdigit())
    return int(digits) if digits else 0
