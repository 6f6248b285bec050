"""`finetune demo`: teach each strategy its shapes-world concept (both concepts with --full), measure, report.

Each run is an ordinary recipe in recipes/shapes/ (`<strategy>_<concept>.yaml`), trained by the one loop,
then judged by the shipped evaluator against the shipped base.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm.auto import tqdm

from finetune.console import progress_bar
from finetune.demo.page import write_demo_page
from finetune.demo.report import aggregate, write_markdown
from finetune.io.atomic import write_text_atomically
from finetune.recipe.load import load_recipe
from finetune.report.evaluations import save_evaluation
from finetune.shapes import metrics
from finetune.shapes.concepts import CONCEPTS
from finetune.shapes.evaluate import load_base_pipeline, tuned_pipeline
from finetune.shapes.evaluator import Evaluator
from finetune.shapes.scorecard import score

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "shapes"
# the demo recipes of each shipped base: the U-Net's (a tiny SD 1.x) beside the README's examples, the transformer's
# (a tiny SD3, flow matching) in their own folder; each names its base in model.base
BASE_RECIPES = {"unet": RECIPES, "transformer": RECIPES / "transformer"}
BASES = tuple(BASE_RECIPES)
GRID_IMAGES = 4  # per prompt in the before/after grids
GRID_SEED = 7  # of the noise the before and after grids both start from
# extra runs: a demo recipe with one thing changed, to show what that thing does; on the U-Net base only (one base
# shows it, and the default demo's time is spent on the targets): (label, strategy kind, concept, overrides)
VARIANTS = [("dreambooth_no_prior", "dreambooth", "new_object", ["prior.mode=none"])]
VARIANT_BASE = "unet"
VALIDATION_POINTS = 10  # validation scores per run (validation.every: its steps / 10), for a curve on the page


def available_strategies(base: str = "unet") -> list[str]:
    """The strategies with a demo recipe for both concepts on `base` (unet or transformer)."""
    from finetune.strategies import KINDS

    folder = BASE_RECIPES[base]
    return [kind for kind in KINDS if all((folder / f"{kind}_{c}.yaml").is_file() for c in CONCEPTS)]


QUICK = ("lora", "new_object")  # --quick: the headline alone, LoRA teaching the star the base never drew
# the default demo runs each strategy on the concept its targets are judged on (report.TARGETS), which keeps both
# bases within 25 minutes on a 2-core CPU; --full adds the other concept and the VARIANTS
TARGET_CONCEPT = {"lora": "new_object", "dreambooth": "new_object", "textual_inversion": "known_look",
                  "hypernetwork": "known_look"}


def demo_pairs(bases: tuple[str, ...], strategies: list[str] | None = None, quick: bool = False,
               full: bool = False) -> list[tuple[str, str, str, str, list[str]]]:
    """What the demo runs, in order: (base, label, strategy, concept, recipe overrides). `strategies` None: every
    strategy with demo recipes on that base. A strategy without a TARGET_CONCEPT runs both concepts."""
    pairs = []
    for base in bases:
        offered = available_strategies(base)
        for strategy in [s for s in ([QUICK[0]] if quick else strategies or offered) if s in offered]:
            if quick:
                concepts = [QUICK[1]]
            elif full or strategy not in TARGET_CONCEPT:
                concepts = list(CONCEPTS)
            else:
                concepts = [TARGET_CONCEPT[strategy]]
            pairs += [(base, strategy, strategy, concept, []) for concept in concepts]
            if full:
                pairs += [(base, *variant) for variant in VARIANTS if variant[1] == strategy and base == VARIANT_BASE]
    return pairs


def run_demo(out_dir: str | Path, strategies: list[str] | None = None, max_steps: int | None = None,
             quick: bool = False, seeds: int = 1, bases: tuple[str, ...] = BASES, full: bool = False) -> dict:
    """Train, judge and report on each of `bases` (unet, transformer): each strategy on the concept its targets
    judge, or with `full` on both concepts and the VARIANTS too; `max_steps` shortens every run (the report says
    the targets were not judged); `quick` runs only LoRA on new_object, at its recipe's full length; `seeds` runs
    every recipe with train.seed 0..seeds-1, and the targets are judged on the worst of them.
    Raises ValueError on an unknown base or strategy, or --quick with --strategies or --full, before any work."""
    from finetune.training.loop import train

    if seeds < 1:
        raise ValueError(f"--seeds: at least 1, got {seeds}")
    if quick and (strategies or full):
        raise ValueError("--quick runs LoRA on new_object alone; leave out --strategies and --full, or drop --quick")
    unknown_bases = [b for b in bases if b not in BASE_RECIPES]
    if unknown_bases or not bases:
        raise ValueError(f"--base: {', '.join(unknown_bases) or 'none given'}; one of {', '.join(BASES)} or all")
    out_dir = Path(out_dir)
    offered = {s for b in bases for s in available_strategies(b)}
    unknown = [s for s in strategies or [] if s not in offered]
    if unknown:
        raise ValueError(f"--strategies: no demo recipes for {', '.join(unknown)} on the {'/'.join(bases)} base "
                         f"(available: {', '.join(sorted(offered))})")

    def plan(base: str, label: str, strategy: str, concept: str, changes: list[str]) -> list[tuple]:
        steps = [f"train.max_steps={max_steps}"] if max_steps else []
        path = BASE_RECIPES[base] / f"{strategy}_{concept}.yaml"
        steps += validation_overrides(out_dir, concept, max_steps or load_recipe(path).train.max_steps)
        plans = []
        for seed in range(seeds):
            # the U-Net base's runs keep the folder names of a demo before there were two bases; one seed keeps
            # those of a demo without --seeds
            name = (("" if base == "unet" else f"{base}-") + f"{label}-{concept}"
                    + (f"-seed{seed}" if seeds > 1 else ""))
            recipe = load_recipe(path, [f"output_dir={out_dir / 'runs' / name}", *steps, *changes, f"train.seed={seed}"])
            plans.append((base, label, concept, recipe, name))
        return plans

    # every recipe is checked before any work starts; a recipe's seeds run one after another
    plans = [run for pair in demo_pairs(bases, strategies, quick, full) for run in plan(*pair)]
    evaluator = Evaluator.load()
    bare: dict[str, object] = {}  # each base's pipeline, loaded once
    accuracy: dict[str, float] = {}
    for base in dict.fromkeys(p[0] for p in plans):
        bare[base] = load_base_pipeline(next(p[3].model.base for p in plans if p[0] == base))
        with progress_bar(total=1, desc=f"{base} base accuracy", unit="eval") as bar:
            accuracy[base] = metrics.base_vocabulary_accuracy(bare[base], evaluator)
            bar.update(1)
    # shortened runs are reported, and not judged against targets that need the recipes' own lengths;
    # base_accuracy is the first base's (the report's shape before there were two), `bases` has each one's
    models = {b: str(next(p[3].model.base for p in plans if p[0] == b)) for b in accuracy}
    report = {"base_accuracy": next(iter(accuracy.values())), "max_steps_override": max_steps, "quick": quick,
              "full": full, "seeds": seeds,
              "bases": {b: {"model": models[b], "base_accuracy": accuracy[b]} for b in accuracy},
              "runs": [], "aggregates": []}
    befores: dict[tuple[str, str], Path] = {}  # each base's grid of each concept: the same for every seed/strategy
    for base, strategy, concept_name, recipe, name in plans:
        concept = CONCEPTS[concept_name]
        tqdm.write(f"== {strategy} on {concept_name} ({concept.concept_prompt()!r}), {base} base, "
                   f"seed {recipe.train.seed} ==")
        started = time.perf_counter()
        artifact = train(recipe, overwrite=True)  # the demo owns its runs: running it again replaces them
        pipe = tuned_pipeline(recipe.model.base, artifact)
        numbers = score(pipe, evaluator, concept, accuracy[base], label=f"evaluating {strategy}/{concept_name}")
        seconds = time.perf_counter() - started
        grids = _before_after(bare[base], pipe, concept, out_dir / name, befores, base)
        # the run's own page shows its figures too (output_dir/eval/, as `finetune eval --adapter` writes them)
        save_evaluation(artifact, concept_name, {"base_accuracy": accuracy[base],
                                                 "concept": concept.concept_prompt(), "concept_kind": concept.kind,
                                                 **numbers}, by="finetune demo")
        report["runs"].append({
            "strategy": strategy, "base": base, "seed": recipe.train.seed, "concept_kind": concept.kind,
            "concept": concept.concept_prompt(),
            "concept_fidelity": numbers["concept_fidelity"], "prompt_fidelity": numbers["prompt_fidelity"],
            "prior_drop": numbers["prior_drop"], "seconds": round(seconds, 1), "artifact": str(artifact),
            "prior_preservation": recipe.prior.mode != "none", "steps": recipe.train.max_steps,
            "base_accuracy_after": numbers["base_accuracy_after"], "grids": [str(g) for g in grids],
            "grid_prompts": grid_prompts(concept), "grid_images": GRID_IMAGES, "grid_seed": GRID_SEED,
            "validation": validation_curve(recipe.output_dir),
        })
        report["aggregates"] = aggregate(report["runs"])
        _write(out_dir, report)
    return report


def validation_overrides(out_dir: Path, concept: str, steps: int) -> list[str]:
    """The recipe overrides that give a demo run its validation score: held-out images of the concept drawn by the
    shapes world (out_dir/validation/<concept>, written here; concepts.Concept.draw_held_out), scored about
    VALIDATION_POINTS times. The score draws from its own generator, so the run trains as it would without it."""
    folder = CONCEPTS[concept].write_held_out(out_dir / "validation" / concept)
    return [f"validation.images={folder.resolve()}", f"validation.every={max(1, steps // VALIDATION_POINTS)}"]


def validation_curve(output_dir: str) -> list[list[float]]:
    """[step, validation loss] of each scored step of a run, from its history.jsonl."""
    from finetune.report.history import read_history

    return [[r["step"], r["validation_loss"]] for r in read_history(Path(output_dir).expanduser())
            if r.get("validation_loss") is not None]


def grid_prompts(concept) -> list[str]:
    """The rows of the before/after grids: the concept prompt, three composed prompts, and one the base knew."""
    return [concept.concept_prompt()] + [p for p, _ in concept.composed_prompts()][:3] + ["a red circle"]


def _before_after(bare, tuned, concept, stem: Path, befores: dict[tuple[str, str], Path], base: str) -> list[Path]:
    """The base's and the tuned pipeline's grids; the base's is drawn once per (base, concept) and reused (it is
    the same noise through the same frozen base for every seed and strategy)."""
    from finetune.training.sampling import image_grid, save_png

    prompts = grid_prompts(concept)
    paths = []
    for label, pipe in (("before", bare), ("after", tuned)):
        path = stem.with_name(f"{stem.name}-{label}.png")
        if label == "before" and (base, concept.name) in befores:
            path.write_bytes(befores[base, concept.name].read_bytes())
        else:
            images = metrics.sample(pipe, prompts, GRID_IMAGES, seed=GRID_SEED)
            save_png(image_grid(images, columns=GRID_IMAGES), path)
            if label == "before":
                befores[base, concept.name] = path
        paths.append(path)
    return paths


def _write(out_dir: Path, report: dict) -> None:
    write_text_atomically(out_dir / "demo_report.json", json.dumps(report, indent=2))
    write_markdown(out_dir / "demo_report.md", report)
    write_demo_page(out_dir)
