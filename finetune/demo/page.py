"""demo_report.html: every demo run's before/after grids side by side, labelled, with its figures under them,
built from demo_report.json and the grids beside it (so `finetune report DEMO_OUT` rebuilds it)."""
from __future__ import annotations

import json
import os
from html import escape
from pathlib import Path

from finetune.demo.report import BASE_NAMES, BASE_TARGET, base_accuracies, verdicts
from finetune.io.atomic import write_text_atomically
from finetune.report.grids import labelled_grid
from finetune.report.page import shell
from finetune.report.sources import NotARunFolder

DEMO_PAGE = "demo_report.html"
FIGURES = ("concept_fidelity", "prompt_fidelity", "prior_drop", "base_accuracy_after", "steps", "seconds")
SEEDED = ("concept_fidelity", "prompt_fidelity", "prior_drop")  # the figures `--seeds N` aggregates


def write_demo_page(out_dir: str | Path) -> Path:
    """Build out_dir/demo_report.html from out_dir/demo_report.json (NotARunFolder without it)."""
    out_dir = Path(out_dir)
    try:
        report = json.loads((out_dir / "demo_report.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise NotARunFolder(f"{out_dir}: no readable demo_report.json ({exc}); give the --out folder of "
                            "`finetune demo`") from None
    return write_text_atomically(out_dir / DEMO_PAGE, build_demo_page(out_dir, report))


def build_demo_page(out_dir: Path, report: dict) -> str:
    shortened = report.get("max_steps_override")
    body = ["<h1>finetune demo: the shapes world</h1>"]
    if shortened:
        body.append(f'<p class="state stopped">Shortened run (--max-steps {shortened}): the numbers show the '
                    "machinery working, not what the methods reach; the targets are not judged.</p>")
    if report.get("quick"):
        body.append('<p class="state running">Quick look (--quick): LoRA on new_object only.</p>')
    for name, value in base_accuracies(report).items():
        body.append(f"<p>{escape(BASE_NAMES.get(name, name))} base's accuracy on its own 36 prompts: <b>{value:.3f}</b> "
                    f"(target &ge; {BASE_TARGET:.2f}).</p>")
    seeded = report.get("seeds", 1) > 1
    if seeded:
        body += _over_seeds(report, bool(shortened))
    for run in report["runs"]:
        body += _run(out_dir, run, verdicts(run), bool(shortened), seeded)
    return shell("finetune demo report", body, refresh=False)


def _over_seeds(report: dict, shortened: bool) -> list[str]:
    """The aggregate table of `--seeds N`: mean and worst seed of each figure, targets judged on the worst."""
    out = [f"<h2>Over {report['seeds']} seeds</h2>",
           (f"<p>Each recipe ran with train.seed 0 to {report['seeds'] - 1}; the targets are judged on the worst "
            "seed (the lowest fidelity, the highest drop). Every run's grids follow.</p>")]
    head = "".join(f"<th>{escape(h)}</th>" for h in (
        "base", "strategy", "concept", "seeds",
        *(f"{f} mean / {'max' if f == 'prior_drop' else 'min'}" for f in SEEDED),
        "targets (worst seed)"))
    rows = []
    for entry in report.get("aggregates", []):
        checks = entry.get("targets", {})
        targets = ("not judged: shortened" if shortened and checks else
                   ", ".join(f"{m} {'ok' if ok else 'MISSED'}" for m, ok in checks.items()) or "none set")
        cells = [entry.get("base") or "unet", entry["strategy"], entry["concept_kind"],
                 str(len(entry["seeds"]))] + [
            f"{_number(entry[f]['mean'])} / {_number(entry[f]['worst'])}" for f in SEEDED]
        rows.append("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in cells) + f"<td>{escape(targets)}</td></tr>")
    return out + [f"<table><tr>{head}</tr>" + "".join(rows) + "</table>"]


def _run(out_dir: Path, run: dict, checks: dict[str, bool], shortened: bool, seeded: bool = False) -> list[str]:
    title = (f"{run['strategy']} on {run['concept_kind']}, {run.get('base', 'unet')} base"
             + (f", seed {run.get('seed')}" if seeded else ""))
    out = [f"<h2>{escape(title)}: <code>{escape(run['concept'])}</code></h2>"]
    prompts = run.get("grid_prompts") or []
    count, seed = int(run.get("grid_images") or 0), run.get("grid_seed")
    grids = [_beside(out_dir, g) for g in run.get("grids", [])]
    shown = []
    for label, grid in zip(("before (the base)", "after (tuned)"), grids):
        if grid.is_file():
            shown.append(labelled_grid(grid, prompts, [""] * len(prompts),
                                       [f"image {i + 1}" for i in range(count)], f"{label}: {grid.name}",
                                       cell=96, label_column="max-content"))
        else:
            shown.append(f'<p class="note">{escape(label)}: {escape(str(grid))} is missing.</p>')
    out.append('<div class="pair">' + "".join(shown) + "</div>")
    if seed is not None:
        out.append(f'<p class="note">Every cell starts from the same noise before and after (one tensor drawn from '
                   f"seed {seed}, cell by cell), so the two grids differ only by the training.</p>")
    head = "".join(f"<th>{escape(k)}</th>" for k in ("prior preservation", *FIGURES, "targets"))
    targets = (f"not judged: shortened to {run.get('steps')} steps" if shortened and checks else
               ", ".join(f"{m} {'ok' if ok else 'MISSED'}" for m, ok in checks.items()) or "none set")
    cells = [("yes" if run.get("prior_preservation") else "no")] + [
        f"{run['seconds']:.0f}" if k == "seconds" and run.get(k) is not None else _number(run.get(k)) for k in FIGURES]
    out.append(f"<table><tr>{head}</tr><tr>" + "".join(f'<td class="n">{escape(c)}</td>' for c in cells)
               + f"<td>{escape(targets)}</td></tr></table>")
    out += _validation(run)
    # the artifact (file or pipeline folder)'s run: out_dir/runs/NAME, wherever the demo ran from
    page = out_dir / "runs" / Path(run.get("artifact", "")).parent.name / "report.html"
    if run.get("artifact") and page.is_file():
        link = Path(os.path.relpath(page.resolve(), out_dir.resolve())).as_posix()
        out.append(f'<p><a href="{escape(link)}">this run\'s report</a>: curves, sample grids, data, files</p>')
    return out


def _validation(run: dict) -> list[str]:
    """The run's validation curve (held-out images of its concept, drawn by the shapes world) beside the concept
    fidelity it ended with: the loss on images it never trained on falls as it learns the concept."""
    curve = run.get("validation") or []
    if not curve:
        return []
    from finetune.report import charts

    svg = charts.line_chart([("held-out concept images", [s for s, _ in curve], [v for _, v in curve],
                              {"color": "#e6550d", "linewidth": 1.6, "marker": "o", "markersize": 3})],
                            title="Validation loss", ylabel="loss")
    (first_step, first), (last_step, last) = curve[0], curve[-1]
    best_step, best = min(curve, key=lambda point: point[1])
    said = (f"Validation loss {first:.4g} at step {first_step}, lowest {best:.4g} at step {best_step}, {last:.4g} at "
            f"step {last_step}: the loss at fixed noise and timesteps on held-out images the shapes world drew for "
            "this concept (its captions, other draws), never trained on; rising after its lowest point, the run "
            "fits its own training images more than the concept.")
    return [f'<div class="charts"><div>{svg}</div><div><p>concept fidelity <b>{_number(run.get("concept_fidelity"))}'
            f'</b></p><p class="note">{escape(said)}</p></div></div>']


def _beside(out_dir: Path, grid: str) -> Path:
    """A grid's file: the demo draws each one beside demo_report.json, and the JSON keeps the path as the demo
    named it, relative to the folder it ran from (`--out demo_output`: demo_output/x.png), so only its name is
    looked up in out_dir (which also holds after the folder moves)."""
    return out_dir / Path(grid).name


def _number(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "" if value is None else str(value)
