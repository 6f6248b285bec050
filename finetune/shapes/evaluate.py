"""`finetune eval`: the shapes-world metrics for a base and, optionally, an adapter on it or a tuned pipeline; and
loading those pipelines (the demo judges its runs through the same two functions)."""
from __future__ import annotations

from pathlib import Path

from finetune.shapes import metrics
from finetune.shapes.concepts import get_concept
from finetune.shapes.evaluator import Evaluator
from finetune.shapes.paths import base_path
from finetune.shapes.scorecard import score


def evaluate(base: str | Path | None, adapter: str | Path | None, concept_name: str) -> dict:
    """The metrics of `base` (a shipped base's name, unet or transformer, or a folder; None: unet), with `adapter`
    (a file or a tuned pipeline folder) on it when given. Raises KeyError on an unknown concept, FileNotFoundError
    on a missing adapter or base."""
    concept = get_concept(concept_name)  # a typo fails before anything loads
    if adapter is not None and not Path(adapter).exists():
        raise FileNotFoundError(f"--adapter: {adapter} not found")
    evaluator = Evaluator.load()
    base = base_path(base)  # a shipped base's name, or a folder
    pipe = load_base_pipeline(base)
    bare_accuracy = metrics.base_vocabulary_accuracy(pipe, evaluator)
    if adapter is not None:
        pipe = tuned_pipeline(base, adapter)
    numbers = score(pipe, evaluator, concept, bare_accuracy, adapted=adapter is not None)
    return {"base_accuracy": bare_accuracy, "concept": concept.concept_prompt(), "concept_kind": concept.kind,
            **numbers}


def load_base_pipeline(base: str | Path):
    """The pipeline class a folder's model_index.json names (SD, SD3, ...), without the parts it was saved
    without (the transformer base has no T5)."""
    from diffusers import DiffusionPipeline

    from finetune.models.pipeline_folder import parts_stored_as_none

    pipe = DiffusionPipeline.from_pretrained(str(base), **parts_stored_as_none(base))
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
