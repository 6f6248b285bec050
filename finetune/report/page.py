"""output_dir/report.html: one self-contained page (charts as inline SVG, sample grids as data: URIs, nothing
fetched) built from what the run folder holds, so the loop's page and `finetune report`'s are the same."""
from __future__ import annotations

import json
import statistics
import time
from html import escape
from pathlib import Path
from typing import Any

from finetune.io.atomic import write_text_atomically
from finetune.report import sources
from finetune.report.history import read_history, read_run_info

REPORT = "report.html"
REFRESH_SECONDS = 30  # how often a running run's page reloads itself
CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1180px;
 padding:0 16px;color:#1d1d1f;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:3px}
.sub{color:#555;margin:0 0 10px}.state{padding:6px 10px;border-radius:6px;display:inline-block;margin:4px 0 8px}
.running{background:#e8f1fb}.finished{background:#e7f6ea}.stopped{background:#fdf0e6}.unknown{background:#f2f2f2}
table{border-collapse:collapse;margin:4px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;
 vertical-align:top}th{background:#f6f6f6}td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
pre{background:#f7f7f7;padding:8px 10px;overflow-x:auto;font-size:12px;white-space:pre-wrap}
.charts{display:flex;flex-wrap:wrap;gap:8px}.charts svg{width:100%;max-width:580px;height:auto}
.note{color:#666;font-size:12px}figure.grid{margin:10px 0 18px}figcaption{color:#333;font-size:13px;font-weight:600;margin:4px 0}
.cells{display:grid;gap:0;align-items:center}.col{text-align:center;font-size:12px;color:#555;padding-bottom:2px}
.row{padding-right:8px;font-size:12px;display:flex;flex-direction:column;justify-content:center;height:100%}
.row .prompt{font-family:ui-monospace,Menlo,monospace;word-break:break-word}
img.px{image-rendering:pixelated;display:block}.pair{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
"""


def shell(title: str, body: list[str], refresh: bool) -> str:
    """The page around `body` (HTML fragments); `refresh`: reload every REFRESH_SECONDS (a run still going)."""
    meta = f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">' if refresh else ""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{meta}<title>{escape(title)}</title>'
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(output_dir: str | Path) -> Path:
    """Build and write output_dir/report.html atomically; NotARunFolder when the folder holds no run."""
    output_dir = sources.check_run_folder(Path(output_dir))
    return write_text_atomically(output_dir / REPORT, build_page(output_dir))


def build_page(output_dir: Path) -> str:
    info, history = read_run_info(output_dir), read_history(output_dir)
    recipe, recipe_source = sources.find_recipe(output_dir, info)
    state = info.get("state") or ("finished" if any((output_dir / a).exists() for a in sources.ARTIFACTS)
                                  else "unknown")
    strategy = (recipe or {}).get("strategy", {}).get("kind", "?")
    base = (recipe or {}).get("model", {}).get("base", "?")
    body = [f"<h1>{escape(output_dir.resolve().name)}</h1>",
            (f'<p class="sub">{escape(strategy)} on <code>{escape(str(base))}</code> &middot; '
            f"<code>{escape(str(output_dir.resolve()))}</code></p>"),
            _state_line(state, info, history, recipe)]
    body += _progress(info, history, recipe, state)
    body += _curves(history, bool(info))
    body += _samples(output_dir, info, recipe, {r["step"]: r for r in history})
    body += _evaluations(output_dir)
    body += _data(output_dir, info)
    body += _files(output_dir)
    body += ["<h2>Recipe</h2>"]
    body += ([f'<p class="note">from {escape(recipe_source)}</p>', f"<pre>{escape(_yaml(recipe))}</pre>"]
             if recipe else [('<p class="note">No recipe in this folder (no run.json, checkpoint or artifact '
                             "header holds one).</p>")])
    return shell(f"{output_dir.resolve().name}: finetune report", body, refresh=state == "running")


def _when(seconds: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) if seconds else "?"


def duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return (f"{hours}h {rest // 60:02d}m" if hours else f"{rest // 60}m {rest % 60:02d}s" if rest >= 60
            else f"{rest}s")


def _max_steps(info: dict, recipe: dict | None) -> int | None:
    return info.get("max_steps") or (recipe or {}).get("train", {}).get("max_steps")


def eta_seconds(history: list[dict], max_steps: int | None, window: int = 50) -> float | None:
    """Seconds left at the recent pace (elapsed time per step over the last `window` steps, saves included)."""
    if not max_steps or len(history) < 2:
        return None
    recent = history[-window:]
    steps = recent[-1]["step"] - recent[0]["step"]
    spent = (recent[-1].get("elapsed") or 0) - (recent[0].get("elapsed") or 0)
    return max(0, max_steps - recent[-1]["step"]) * spent / steps if steps > 0 and spent > 0 else None


def _state_line(state: str, info: dict, history: list[dict], recipe: dict | None) -> str:
    last = history[-1]["step"] if history else None
    total = _max_steps(info, recipe)
    if state == "running":
        eta = eta_seconds(history, total)
        text = (f"Running: step {last or 0} of {total or '?'}"
                + (f", about {duration(eta)} to go" if eta is not None else "")
                + f" (as of {_when(history[-1]['time'] if history else info.get('updated'))}; this page reloads "
                  f"every {REFRESH_SECONDS} s and is rewritten about as often, and at every checkpoint and sample step)")
    elif state == "finished":
        text = (f"Finished: {last if last is not None else total or '?'} steps"
                + (f", at {_when(info.get('ended'))}" if info.get("ended") else ""))
    elif state == "stopped":
        text = f"Stopped after step {last or 0} of {total or '?'}: {info.get('reason') or 'no reason recorded'}"
    else:
        text = "State unknown: no run.json and no finished artifact in this folder"
    return f'<p class="state {escape(state)}">{escape(text)}</p>'


def _progress(info: dict, history: list[dict], recipe: dict | None, state: str) -> list[str]:
    rows = []
    if history:
        recent = history[-20:]
        speed = statistics.median(r["seconds_per_step"] for r in recent if r.get("seconds_per_step"))
        rate = [r["samples_per_second"] for r in recent if r.get("samples_per_second")]
        rows += [("steps", f"{history[-1]['step']} of {_max_steps(info, recipe) or '?'}"),
                 ("time taken", (f"{duration(history[-1].get('elapsed') or 0)} of training (sample grids and "
                                "checkpoints included; pauses between resumed sessions not)")),
                 ("seconds per step", f"{speed:.3g} (median of the last {len(recent)} steps, the step alone)"),
                 ("samples per second", f"{statistics.median(rate):.3g} (effective batch "
                                        f"{info.get('effective_batch', '?')})" if rate else "?")]
        if state == "running":
            eta = eta_seconds(history, _max_steps(info, recipe))
            rows.append(("ETA", duration(eta) if eta is not None else "after a few more steps"))
        peaks = [r["peak_memory_bytes"] for r in history if r.get("peak_memory_bytes")]
        device = info.get("device", "?")
        rows.append(("peak memory", f"{sources.human_size(max(peaks))} (torch max_memory_allocated on {device})"
                     if peaks else f"not reported on {device} (torch reports peak memory on CUDA and XPU devices)"))
    if info.get("started"):
        rows.append(("started", _when(info["started"])))
    if not rows:
        return []
    return ["<h2>Progress</h2><table>" + "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>"
                                                  for k, v in rows) + "</table>"]


def _curves(history: list[dict], recorded: bool) -> list[str]:
    out = ["<h2>Curves</h2>"]
    if not history:
        why = ("no step has finished yet" if recorded else
               "this folder has no history.jsonl: the run was made before finetune wrote one (TensorBoard or W&B "
               "files in logs/ hold its curves when log.to was set)")
        return out + [f'<p class="note">No curves: {escape(why)}.</p>']
    from finetune.report import charts

    steps = [r["step"] for r in history]
    scored = [(r["step"], r["validation_loss"]) for r in history if r.get("validation_loss") is not None]
    svgs = [charts.loss_chart(steps, [r["loss"] for r in history], ([s for s, _ in scored], [v for _, v in scored])),
            charts.lr_chart(steps, [r["lr"] for r in history]),
            charts.speed_chart(steps, [r.get("seconds_per_step") for r in history]), *charts.grid_score_charts(history)]
    return out + ['<div class="charts">' + "".join(f"<div>{svg}</div>" for svg in svgs) + "</div>",
                  (f'<p class="note">From history.jsonl ({len(history)} steps); smoothed: exponential moving '
                  f"average, weight {charts.SMOOTHING}." + _validation_note(scored) + "</p>")]


def _validation_note(scored: list[tuple[int, float]]) -> str:
    """What the held-out curve says: its last score and its best (training past the best may be overfitting)."""
    if not scored:
        return ""
    best = min(scored, key=lambda point: point[1])
    return escape(f" Validation loss (held-out images, fixed noise and timesteps): {scored[-1][1]:.4g} at step "
                  f"{scored[-1][0]}, lowest {best[1]:.4g} at step {best[0]}.")


def _samples(output_dir: Path, info: dict, recipe: dict | None, by_step: dict[int, dict]) -> list[str]:
    from finetune.report.grids import labelled_grid

    grids = sources.sample_grids(output_dir)
    out = ["<h2>Sample grids</h2>"]
    if not grids:
        return out + ['<p class="note">No sample grids (sample.every is 0, or none is due yet).</p>']
    out.append('<p class="note">Rows: the prompts, each drawn from its own seed (and the settings it sets '
               "apart from the recipe's, named under it); columns: an edit model's control images, if any, then "
               "successive images from that seed. The same "
               "prompts and seeds at every step, so grids compare. Small images are shown enlarged without "
               "smoothing; the PNGs in samples/ are as written.</p>")
    fallback = (recipe or {}).get("sample", {})
    for step, path in grids:
        labels = info.get("samples", {}).get(path.name) or fallback
        # a recipe's prompt may be a mapping with its own settings (sample.prompts); its text labels the row
        prompts = [p.get("prompt", "") if isinstance(p, dict) else p for p in labels.get("prompts") or []]
        seed, count = labels.get("seed", 0), int(labels.get("images_per_prompt") or 1)
        notes = labels.get("notes") or [f"seed {seed + row}" for row in range(len(prompts))]
        columns = [f"control {i + 1}" for i in range(int(labels.get("controls") or 0))]  # edit models' grids
        out.append(labelled_grid(path, prompts, notes, columns + [f"image {i + 1}" for i in range(count)],
                                 f"step {step} ({path.name})", row_heights=labels.get("heights")))
        out += _grid_scores(by_step.get(step, {}))
    return out


def _grid_scores(record: dict) -> list[str]:
    """A grid's scores as its step's history line holds them (validation.clip_model / dino_model), if any."""
    said = [f"{name} {record[key]:.4g}" for key, name in (("clip_score", "CLIP score (x100 cosine, vs. its prompt)"),
                                                          ("dino_similarity", "DINO similarity to the training images"))
            if record.get(key) is not None]
    return [f'<p class="note">{escape(", ".join(said))}</p>'] if said else []


def _evaluations(output_dir: Path) -> list[str]:
    found = sources.eval_figures(output_dir)
    if not found:
        return []
    keys = [k for k in ("concept_fidelity", "prompt_fidelity", "prior_drop", "base_accuracy", "base_accuracy_after")
            if any(k in figures for _, figures in found)]
    head = "".join(f"<th>{escape(k)}</th>" for k in ["judged", "concept", *keys])
    rows = "".join("<tr><td>" + escape(label) + f"</td><td><code>{escape(str(f.get('concept', '')))}</code></td>"
                   + "".join(f'<td class="n">{_figure(f.get(k))}</td>' for k in keys) + "</tr>" for label, f in found)
    return ["<h2>Evaluation</h2>", f"<table><tr>{head}</tr>{rows}</table>",
            (f'<p class="note">From {sources.EVAL_DIR}/*.json, written by <code>finetune eval --adapter</code> on '
            "this run's artifact and by <code>finetune demo</code>; prior_drop is points of the base's accuracy "
            "lost.</p>")]


def _figure(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else escape(str(value)) if value is not None else ""


def _data(output_dir: Path, info: dict) -> list[str]:
    out = ["<h2>Data and plan</h2>"]
    if info.get("plan"):
        out.append(f"<pre>{escape(chr(10).join(info['plan']))}</pre>")
    else:
        out.append('<p class="note">Not recorded: the run was made before finetune wrote run.json.</p>')
    out += [f"<p>{escape(note)}</p>" for note in info.get("notes", [])]
    if info.get("plan") and not info.get("notes"):
        out.append('<p class="note">captions: none longer than the text encoder\'s window.</p>')
    buckets = output_dir / "buckets.json"
    if buckets.is_file():
        from finetune.data.buckets import format_report

        try:
            out.append(f"<p>Aspect-ratio buckets (buckets.json):</p><pre>"
                       f"{escape(format_report(json.loads(buckets.read_text())))}</pre>")
        except (ValueError, KeyError, TypeError):
            out.append('<p class="note">buckets.json is unreadable.</p>')
    return out


def _files(output_dir: Path) -> list[str]:
    from finetune.report.sources import written_entries

    rows = []
    for path, what in written_entries(output_dir, since=0):
        if path.name == REPORT:
            continue  # this page
        name = path.relative_to(output_dir.resolve()).as_posix() + ("/" if path.is_dir() else "")
        rows.append(f"<tr><td><code>{escape(name)}</code></td><td class=\"n\">"
                    f"{sources.human_size(sources.folder_size(path))}</td><td>{escape(what)}</td></tr>")
    return ["<h2>Files</h2>", "<table><tr><th>file</th><th>size</th><th>what it is, and what reads it</th></tr>"
            + "".join(rows) + "</table>"]


def _yaml(recipe: dict) -> str:
    import yaml

    return yaml.safe_dump(recipe, sort_keys=False, default_flow_style=False, allow_unicode=True)
