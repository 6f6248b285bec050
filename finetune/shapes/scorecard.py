"""The four numbers a shapes-world run is judged by, from a pipeline that may carry an adapter."""
from __future__ import annotations


from finetune.console import progress_bar

from finetune.shapes import metrics
from finetune.shapes.concepts import Concept
from finetune.shapes.evaluator import Evaluator


def score(pipe, evaluator: Evaluator, concept: Concept, bare_accuracy: float, adapted: bool = True,
          label: str = "evaluating") -> dict:
    """concept_fidelity, prompt_fidelity, prior_drop (points of base-vocabulary accuracy lost), and the
    adapted pipeline's own base-vocabulary accuracy. `bare_accuracy` is the base's, measured once."""
    with progress_bar(total=3, desc=label, unit="metric") as bar:
        after = metrics.base_vocabulary_accuracy(pipe, evaluator) if adapted else bare_accuracy
        bar.update(1)
        concept_fidelity = metrics.concept_fidelity(pipe, evaluator, concept)
        bar.update(1)
        prompt_fidelity = metrics.prompt_fidelity(pipe, evaluator, concept)
        bar.update(1)
    return {
        "concept_fidelity": concept_fidelity,
        "prompt_fidelity": prompt_fidelity,
        "prior_drop": round((bare_accuracy - after) * 100.0, 2),
        "base_accuracy_after": after,
    }
