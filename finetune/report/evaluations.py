"""Where evaluation figures go so a run's page shows them: output_dir/eval/<label>.json, written by
`finetune eval --adapter` when the adapter lies in a run's output_dir, and by `finetune demo` for each run; the
run's report.html is rewritten with them."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from finetune.io.atomic import write_text_atomically
from finetune.report.sources import EVAL_DIR, eval_label, run_folder_of


def save_evaluation(artifact: str | os.PathLike, concept: str, figures: dict[str, Any],
                    by: str) -> tuple[Path, Path] | None:
    """Write `figures` for the run that wrote `artifact` and rebuild its page: (figures file, report.html), or
    None when the artifact lies outside any run's output_dir (nothing written). `by`: the command that judged."""
    from finetune.report.page import write_report

    run = run_folder_of(artifact)
    if run is None:
        return None
    relative = Path(artifact).resolve().relative_to(run).as_posix()
    path = run / EVAL_DIR / f"{eval_label(run, artifact, concept)}.json"
    write_text_atomically(path, json.dumps({**figures, "artifact": relative, "by": by}, indent=2))
    return path, write_report(run)
