"""`finetune demo`: teach both shapes-world concepts with every strategy, measure, and write a report.

Each run is an ordinary recipe in recipes/shapes/ (`<strategy>_<concept>.yaml`), trained by the one loop,
then judged by the shipped evaluator against the shipped base.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm.auto import tqdm

from finetune.console import quiet
from finetune.paths import write_text_atomically
from finetune.recipe.load import load_recipe
from finetune.report.demo_page import write_demo_page
from finetune.report.evaluations import save_evaluation
from finetune.shapes import metrics
from finetune.shapes.concepts import CONCEPTS
from finetune.shapes.evaluator import Evaluator
from finetune.shapes.report import aggregate, write_markdown
from finetune.shapes.scorecard import score

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "shapes"
GRID_IMAGES = 4  # per prompt in the before/after grids
GRID_SEED = 7  # of the noise the before and after grids both start from
# extra runs: a demo recipe with one thing changed, to show what that thing does
# (label, strategy kind, concept, overrides)
VARIANTS = [("dreambooth_no_prior", "dreambooth", "new_object", ["prior.mode=none"])]


def available_strategies() -> list[str]:
    from finetune.strategies import KINDS

    return [kind for kind in KINDS if all((RECIPES / f"{kind}_{c}.yaml").is_file() for c in CONCEPTS)]


def load_base_pipeline(base: str | Path):
    """The pipeline class a folder's model_index.json names (SD, SDXL, ...)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(base))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tuned_pipeline(base: str | Path, artifact: str | Path):
    """The base with a training artifact applied: an adapter file loaded onto it, or a whole tuned
    pipeline folder (DreamBooth) in its place."""
    from finetune import load_adapter

    if (Path(artifact) / "model_index.json").is_file():
        return load_base_pipeline(artifact)
    pipe = load_base_pipeline(base)
    load_adapter(pipe, artifact)
    return pipe


QUICK = ("lora", "new_object")  # --quick: the headline alone, LoRA teaching the star the base never drew


BASE = "unet"  # the shipped base every run trains on (a second base would add its own runs)


def run_demo(out_dir: str | Path, strategies: list[str] | None = None, max_steps: int | None = None,
             quick: bool = False, seeds: int = 1) -> dict:
    """Train, judge and report; `max_steps` shortens every run (the report says the targets were not judged);
    `quick` runs only LoRA on new_object, at its recipe's full length; `seeds` runs every recipe with
    train.seed 0..seeds-1, and the targets are judged on the worst of them."""
    from finetune.training.loop import train

    if seeds < 1:
        raise ValueError(f"--seeds: at least 1, got {seeds}")
    if quick and strategies:
        raise ValueError("--quick runs LoRA on new_object alone; leave out --strategies, or drop --quick")
    out_dir = Path(out_dir)
    strategies = [QUICK[0]] if quick else strategies or available_strategies()
    unknown = [s for s in strategies if s not in available_strategies()]
    if unknown:
        raise ValueError(f"--strategies: no demo recipes for {', '.join(unknown)} in {RECIPES} "
                         f"(available: {', '.join(available_strategies())})")
    def plan(label: str, strategy: str, concept: str, changes: list[str]) -> list[tuple]:
        steps = [f"train.max_steps={max_steps}"] if max_steps else []
        plans = []
        for seed in range(seeds):
            # one seed keeps the folder names of a demo without --seeds
            name = f"{label}-{concept}" + (f"-seed{seed}" if seeds > 1 else "")
            recipe = load_recipe(RECIPES / f"{strategy}_{concept}.yaml",
                                 [f"output_dir={out_dir / 'runs' / name}", *steps, *changes, f"train.seed={seed}"])
            plans.append((label, concept, recipe, name))
        return plans

    # every recipe is checked before any work starts; a recipe's seeds run one after another
    plans = []
    for strategy in strategies:
        for concept in CONCEPTS:
            if not quick or concept == QUICK[1]:
                plans += plan(strategy, strategy, concept, [])
        for variant in VARIANTS:
            if variant[1] == strategy and not quick:
                plans += plan(*variant)
    evaluator = Evaluator.load()
    base = plans[0][2].model.base
    bare = load_base_pipeline(base)
    with tqdm(total=1, desc="base accuracy", unit="eval", disable=quiet()) as bar:
        bare_accuracy = metrics.base_vocabulary_accuracy(bare, evaluator)
        bar.update(1)
    # shortened runs are reported, and not judged against targets that need the recipes' own lengths
    report = {"base_accuracy": bare_accuracy, "max_steps_override": max_steps, "quick": quick, "seeds": seeds,
              "runs": [], "aggregates": []}
    befores: dict[str, Path] = {}  # the base's grid of each concept: the same for every seed and strategy
    for strategy, concept_name, recipe, name in plans:
        concept = CONCEPTS[concept_name]
        tqdm.write(f"== {strategy} on {concept_name} ({concept.concept_prompt()!r}), seed {recipe.train.seed} ==")
        started = time.perf_counter()
        artifact = train(recipe, overwrite=True)  # the demo owns its runs: running it again replaces them
        pipe = tuned_pipeline(base, artifact)
        numbers = score(pipe, evaluator, concept, bare_accuracy, label=f"evaluating {strategy}/{concept_name}")
        seconds = time.perf_counter() - started
        grids = _before_after(bare, pipe, concept, out_dir / name, befores)
        # the run's own page shows its figures too (output_dir/eval/, as `finetune eval --adapter` writes them)
        save_evaluation(artifact, concept_name, {"base_accuracy": bare_accuracy, "concept": concept.concept_prompt(),
                                                 "concept_kind": concept.kind, **numbers}, by="finetune demo")
        report["runs"].append({
            "strategy": strategy, "base": BASE, "seed": recipe.train.seed, "concept_kind": concept.kind,
            "concept": concept.concept_prompt(),
            "concept_fidelity": numbers["concept_fidelity"], "prompt_fidelity": numbers["prompt_fidelity"],
            "prior_drop": numbers["prior_drop"], "seconds": round(seconds, 1), "artifact": str(artifact),
            "prior_preservation": recipe.prior.mode != "none", "steps": recipe.train.max_steps,
            "base_accuracy_after": numbers["base_accuracy_after"], "grids": [str(g) for g in grids],
            "grid_prompts": grid_prompts(concept), "grid_images": GRID_IMAGES, "grid_seed": GRID_SEED,
        })
        report["aggregates"] = aggregate(report["runs"])
        _write(out_dir, report)
    return report


def grid_prompts(concept) -> list[str]:
    """The rows of the before/after grids: the concept prompt, three composed prompts, and one the base knew."""
    return [concept.concept_prompt()] + [p for p, _ in concept.composed_prompts()][:3] + ["a red circle"]


def _before_after(bare, tuned, concept, stem: Path, befores: dict[str, Path]) -> list[Path]:
    """The base's and the tuned pipeline's grids; the base's is drawn once per concept and reused (it is the same
    noise through the same frozen base for every seed and strategy)."""
    from finetune.training.sampling import image_grid, save_png

    prompts = grid_prompts(concept)
    paths = []
    for label, pipe in (("before", bare), ("after", tuned)):
        path = stem.with_name(f"{stem.name}-{label}.png")
        if label == "before" and concept.name in befores:
            path.write_bytes(befores[concept.name].read_bytes())
        else:
            images = metrics.sample(pipe, prompts, GRID_IMAGES, seed=GRID_SEED)
            save_png(image_grid(images, columns=GRID_IMAGES), path)
            if label == "before":
                befores[concept.name] = path
        paths.append(path)
    return paths


def _write(out_dir: Path, report: dict) -> None:
    write_text_atomically(out_dir / "demo_report.json", json.dumps(report, indent=2))
    write_markdown(out_dir / "demo_report.md", report)
    write_demo_page(out_dir)
