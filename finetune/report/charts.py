"""The report's charts: matplotlib figures saved as SVG text, to be inlined in the page (nothing fetched).

matplotlib is imported here only, when a page is written, so the command line starts without it. Figures are
made with matplotlib.figure.Figure (no pyplot, no GUI backend); glyphs become paths and ids are salted with a
constant, so the same history always gives the same SVG.
"""
from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Sequence

SMOOTHING = 0.9  # weight of the past in the smoothed loss (an exponential moving average, as TensorBoard's)
MAX_POINTS = 2000  # points drawn per series; longer histories are thinned evenly


def quiet_matplotlib() -> None:
    """matplotlib's one-time notices (building its font cache, a temporary config folder) are not the run's
    warnings: its logger keeps only errors unless someone set its level already (`finetune -v` shows them)."""
    logger = logging.getLogger("matplotlib")
    from finetune.console import VERBOSE

    if logger.level == logging.NOTSET and os.environ.get("FINETUNE_VERBOSITY") != str(VERBOSE):
        logger.setLevel(logging.ERROR)


def smoothed(values: Sequence[float], weight: float = SMOOTHING) -> list[float]:
    """Exponential moving average with TensorBoard's debiasing (the first values are not pulled to 0)."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** i))
    return out


def _thin(xs: Sequence[float], ys: Sequence[float]) -> tuple[list[float], list[float]]:
    every = max(1, math.ceil(len(xs) / MAX_POINTS))
    return list(xs[::every]), list(ys[::every])


def line_chart(series: list[tuple[str, Sequence[float], Sequence[float], dict]], *, title: str, ylabel: str,
               log_y: bool = False, from_zero: bool = False) -> str:
    """An SVG document (text, no XML prolog) of lines over steps. `series`: (label, steps, values, matplotlib
    line options) each; non-finite values are left out."""
    quiet_matplotlib()
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context({"svg.hashsalt": "finetune-report", "svg.fonttype": "path", "font.size": 9}):
        figure = Figure(figsize=(6.4, 2.6), layout="constrained")
        axes = figure.subplots()
        for label, xs, ys, style in series:
            kept = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
            if kept:
                axes.plot(*_thin([x for x, _ in kept], [y for _, y in kept]), label=label, **style)
        if log_y and all(y > 0 for _, _, ys, _ in series for y in ys if y is not None):
            axes.set_yscale("log")
        if from_zero:
            axes.set_ylim(bottom=0, top=max(axes.get_ylim()[1], 1e-12))
        axes.set_title(title, loc="left")
        axes.set_xlabel("step")
        axes.set_ylabel(ylabel)
        axes.grid(True, alpha=0.3)
        if len(series) > 1:
            axes.legend(loc="upper right", frameon=False)
        buffer = io.StringIO()
        figure.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def loss_chart(steps: Sequence[int], losses: Sequence[float],
               validation: tuple[Sequence[int], Sequence[float]] | None = None) -> str:
    """The training loss, smoothed, and beside it (`validation`: its steps and values) the held-out loss."""
    series = [("loss", steps, losses, {"color": "#9ecae1", "linewidth": 0.8}),
              (f"smoothed (EMA {SMOOTHING})", steps, smoothed(losses), {"color": "#08519c", "linewidth": 1.6})]
    if validation is not None and validation[0]:
        series.append(("validation (held out)", validation[0], validation[1],
                       {"color": "#e6550d", "linewidth": 1.6, "marker": "o", "markersize": 3}))
    return line_chart(series, title="Loss", ylabel="loss")


def lr_chart(steps: Sequence[int], rates: Sequence[float]) -> str:
    return line_chart([("learning rate", steps, rates, {"color": "#d95f02", "linewidth": 1.4})],
                      title="Learning rate", ylabel="learning rate", from_zero=True)


def speed_chart(steps: Sequence[int], seconds: Sequence[float]) -> str:
    return line_chart([("seconds per step", steps, seconds, {"color": "#1b9e77", "linewidth": 1.0})],
                      title="Seconds per step (the step alone)", ylabel="seconds", from_zero=True)


# history keys of a sample grid's scores (training/grid_scores.py): chart title, y label, colour
GRID_SCORES = {"clip_score": ("CLIP score of the sample grids, each image against its prompt", "CLIP score", "#756bb1"),
               "dino_similarity": ("DINO similarity of the sample grids to the training images", "mean cosine",
                                   "#31a354")}


def grid_score_charts(history: Sequence[dict]) -> list[str]:
    """A chart of each grid score some history line holds (none: [])."""
    charts = []
    for key, (title, ylabel, colour) in GRID_SCORES.items():
        points = [(r["step"], r[key]) for r in history if r.get(key) is not None]
        if points:
            charts.append(line_chart([(key, [s for s, _ in points], [v for _, v in points],
                                       {"color": colour, "linewidth": 1.4, "marker": "o", "markersize": 3})],
                                     title=title, ylabel=ylabel))
    return charts
