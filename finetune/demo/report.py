"""demo_report.md: the demo's numbers next to the targets each strategy is held to."""
from __future__ import annotations

from pathlib import Path

from finetune.io.atomic import write_text_atomically

# (strategy, concept_kind) -> {metric: (">=" or "<=", bound)}; from the issues that define each strategy
TARGETS: dict[tuple[str, str], dict[str, tuple[str, float]]] = {
    ("lora", "new_object"): {"concept_fidelity": (">=", 0.90), "prompt_fidelity": (">=", 0.80),
                             "prior_drop": ("<=", 5.0)},
    ("lora", "known_look"): {"concept_fidelity": (">=", 0.90)},
    ("dreambooth", "new_object"): {"concept_fidelity": (">=", 0.90), "prompt_fidelity": (">=", 0.80),
                                   "prior_drop": ("<=", 5.0)},
    ("textual_inversion", "known_look"): {"concept_fidelity": (">=", 0.90), "prior_drop": ("<=", 1.0)},
    # the issue asks for >= 0.80 with a drift <= 10 on at least one kind; known_look is the one it reaches
    ("hypernetwork", "known_look"): {"concept_fidelity": (">=", 0.80), "prior_drop": ("<=", 10.0)},
}
BASE_NAMES = {"unet": "U-Net", "transformer": "Transformer"}  # how the reports name each shipped base
BASE_TARGET = 0.95  # each shipped base on its own 36 prompts (the transformer base's issue asks 0.95)


def meets(value: float, rule: tuple[str, float]) -> bool:
    op, bound = rule
    return value >= bound if op == ">=" else value <= bound


def verdicts(run: dict) -> dict[str, bool]:
    return {metric: meets(run[metric], rule)
            for metric, rule in TARGETS.get((run["strategy"], run["concept_kind"]), {}).items()}


FIGURES = ("concept_fidelity", "prompt_fidelity", "prior_drop")
WORST = {"concept_fidelity": "min", "prompt_fidelity": "min", "prior_drop": "max"}  # lowest fidelity, highest drop


def aggregate(runs: list[dict]) -> list[dict]:
    """One entry per (base, strategy, concept) over its seeds: mean, min and max of each figure, its worst value
    (min for a fidelity, max for the drop), and the targets judged on that worst value, so a recipe meets a
    target only when it does with every seed."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run.get("base"), run["strategy"], run["concept_kind"]), []).append(run)
    out = []
    for (base, strategy, kind), group in groups.items():
        entry = {"base": base, "strategy": strategy, "concept_kind": kind, "concept": group[0]["concept"],
                 "seeds": [run.get("seed") for run in group]}
        worst = {}
        for figure in FIGURES:
            values = [run[figure] for run in group]
            entry[figure] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}
            worst[figure] = entry[figure]["worst"] = entry[figure][WORST[figure]]
        entry["targets"] = verdicts({"strategy": strategy, "concept_kind": kind, **worst})
        out.append(entry)
    return out


def base_accuracies(report: dict) -> dict[str, float]:
    """Each base's accuracy on its 36 prompts; a report from before there were two bases has the U-Net's alone."""
    bases = report.get("bases") or {"unet": {"base_accuracy": report["base_accuracy"]}}
    return {name: entry["base_accuracy"] for name, entry in bases.items()}


def write_markdown(path: Path, report: dict) -> Path:
    shortened = report.get("max_steps_override")
    lines = [
        "# finetune demo: the shapes world",
        "",
        *([f"**Shortened run** (`--max-steps {shortened}`): every run stopped after {shortened} steps, where the "
           "recipes train for hundreds, so the numbers show the machinery working, not what the methods reach; "
           "the targets are not judged. Run `finetune demo` without it for the real figures.", ""]
          if shortened else []),
        *(["Quick look (`--quick`): LoRA on new_object only, at its recipe's full length; `finetune demo` runs "
           "every strategy.", ""] if report.get("quick") else []),
        *(["Each strategy on the concept its targets judge; `finetune demo --full` also runs the other concept and "
           "DreamBooth without the prior.", ""] if not report.get("quick") and report.get("full") is False else []),
        *[line for name, value in base_accuracies(report).items() for line in (
            f"{BASE_NAMES.get(name, name)} base's accuracy on its own 36 prompts: **{value:.3f}** (target >= "
            f"{BASE_TARGET:.2f}: {'met' if value >= BASE_TARGET else 'NOT met'}).", "")],
        *_over_seeds(report, shortened),
        "| base | strategy | concept | prompt | prior preservation | steps | seed | concept_fidelity "
        "| prompt_fidelity | prior_drop (points) | seconds | targets |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in report["runs"]:
        checks = verdicts(run)
        target_text = ", ".join(f"{m} {'ok' if ok else 'MISSED'}" for m, ok in checks.items()) or "none set"
        if shortened and checks:
            target_text = f"not judged: shortened to {shortened} steps"
        prior = "yes" if run.get("prior_preservation") else "no"
        lines.append(f"| {run.get('base', 'unet')} | {run['strategy']} | {run['concept_kind']} | `{run['concept']}` | {prior} | "
                     f"{run.get('steps', '')} | {run.get('seed', '')} | "
                     f"{run['concept_fidelity']:.3f} | {run['prompt_fidelity']:.3f} | {run['prior_drop']:.1f} | {run['seconds']:.0f} | "
                     f"{target_text} |")
    lines += ["", "Before/after sample grids (rows: the concept prompt, composed prompts, `a red circle`; "
              "left to right: seeds):", ""]
    for run in report["runs"]:
        before, after = (Path(g).name for g in run["grids"])
        seed = f" (seed {run['seed']})" if report.get("seeds", 1) > 1 else ""
        curve = run.get("validation") or []
        held_out = (f"; validation loss {curve[0][1]:.4g} at step {curve[0][0]} -> {curve[-1][1]:.4g} at step "
                    f"{curve[-1][0]}" if curve else "")
        lines.append(f"- {run.get('base', 'unet')} / {run['strategy']} / {run['concept_kind']}{seed}: before `{before}`, after `{after}`; "
                     f"artifact `{run['artifact']}`{held_out}")
    lines += ["", "Targets: " + "; ".join(
        f"{s} on {k}: " + ", ".join(f"{m} {op} {b:g}" for m, (op, b) in rules.items())
        for (s, k), rules in TARGETS.items()
        if any((run["strategy"], run["concept_kind"]) == (s, k) for run in report["runs"])), ""]
    return write_text_atomically(path, "\n".join(lines))


def _over_seeds(report: dict, shortened) -> list[str]:
    """The table judged against the targets when every recipe ran with several seeds (`--seeds N`)."""
    seeds = report.get("seeds", 1)
    if seeds < 2:
        return []
    lines = [(f"Each recipe ran with train.seed 0 to {seeds - 1}; the targets are judged on the worst seed (the "
              "lowest fidelity, the highest drop), so a recipe meets a target only when it does with every seed."),
             "",
             ("| base | strategy | concept | seeds | concept_fidelity mean / min | prompt_fidelity mean / min "
              "| prior_drop mean / max | targets (worst seed) |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for entry in report.get("aggregates", []):
        checks = entry["targets"]
        text = ", ".join(f"{m} {'ok' if ok else 'MISSED'}" for m, ok in checks.items()) or "none set"
        if shortened and checks:
            text = f"not judged: shortened to {shortened} steps"
        cells = [f"{entry[f]['mean']:.{d}f} / {entry[f]['worst']:.{d}f}" for f, d in zip(FIGURES, (3, 3, 1))]
        lines.append(f"| {entry.get('base') or 'unet'} | {entry['strategy']} | {entry['concept_kind']} | "
                     f"{len(entry['seeds'])} | "
                     + " | ".join(cells) + f" | {text} |")
    return [*lines, "", "Every run:", ""]
