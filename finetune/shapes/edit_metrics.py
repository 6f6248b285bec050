"""Edit metrics for a Kontext-style shapes edit model: sample edits of fresh controls, let the evaluator judge them.

- edit_fidelity: the share of results for the held-out edit's instruction ("turn it into a ring") on fresh
  controls that the evaluator names as the edit should leave them (shape ring, the control's colour and size);
- known_edit_accuracy: the same share over the edits the base was trained on (each of `KNOWN_EDITS` equally);
  the edit base's own accuracy, and before minus after a fine-tune, in points, its drift (`drift_points`).

Sampling is fixed as in finetune.shapes.metrics: 20 steps of the pipeline's own flow-matching Euler sampler,
32x32, starting noise for every image drawn up front from one seed (so how the images are split into calls
changes none of them), at most 64 images per `FluxKontextPipeline` call, each figure on at least 200 samples (one
sample moves it by at most 0.5 points). The pipeline is called as a user calls it on a 32 px control:
`image=control, prompt=instruction, _auto_resize=False` (not snapped to Kontext's ~1 MP resolutions),
`max_area=32*32`, and `max_sequence_length` = min(512, tokenizer_2.model_max_length): the T5 tokens the edit base
was trained with (16), which any Kontext fine-tune of it must use too. The shipped edit base has no guidance
embedding (as Flux.1-schnell) and is sampled without classifier-free guidance: one transformer pass a step;
`GUIDANCE` (1.0, the Flux family's training value) only reaches a model that has one.
The controls are drawn from seeds of their own, never the training pairs' integer seeds.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from finetune.shapes import metrics
from finetune.shapes.concepts import matches
from finetune.shapes.edits import HELD_OUT_EDIT, KNOWN_EDITS, Edit, EditPair, sample_edit_pairs
from finetune.shapes.evaluator import Evaluator
from finetune.shapes.world import IMAGE_SIZE

GUIDANCE = 1.0
FIDELITY_SEED, KNOWN_SEED = "edit fidelity", "known edit accuracy"  # the controls' seeds
NOISE_SEED = 3


def t5_tokens(pipe) -> int:
    """The T5 sequence length a Flux-family pipeline must be called with to match training: the tokenizer's
    model_max_length, at most the pipelines' limit of 512."""
    return min(512, pipe.tokenizer_2.model_max_length)


@torch.no_grad()
def sample_edits(pipe, controls: Sequence[Image.Image], instructions: Sequence[str],
                 seed: int = NOISE_SEED) -> list[Image.Image]:
    """One result per (control, instruction), in order, with the fixed sampling settings (module docstring)."""
    if len(controls) != len(instructions):
        raise ValueError(f"{len(controls)} controls for {len(instructions)} instructions: give one each")
    channels = pipe.transformer.config.in_channels // 4  # packed 2x2: four latent pixels per token
    side = 2 * (IMAGE_SIZE // (pipe.vae_scale_factor * 2))
    noise = torch.randn((len(controls), channels, side, side), generator=torch.Generator().manual_seed(seed))
    # packed as the pipeline packs the noise it draws itself; a permutation, so still standard normal
    packed = pipe._pack_latents(noise, len(controls), channels, side, side)
    kept_scheduler = pipe.scheduler
    pipe.scheduler = metrics.judging_scheduler(kept_scheduler)
    pipe.set_progress_bar_config(disable=True)
    images: list[Image.Image] = []
    try:
        for start in range(0, len(controls), metrics.BATCH_IMAGES):
            end = start + metrics.BATCH_IMAGES
            images += pipe(image=list(controls[start:end]), prompt=list(instructions[start:end]),
                           height=IMAGE_SIZE, width=IMAGE_SIZE, max_area=IMAGE_SIZE * IMAGE_SIZE,
                           _auto_resize=False, max_sequence_length=t5_tokens(pipe),
                           num_inference_steps=metrics.STEPS, guidance_scale=GUIDANCE, output_type="pil",
                           latents=packed[start:end].to(pipe.device, pipe.transformer.dtype)).images
    finally:
        pipe.scheduler = kept_scheduler
    return images


def share_right(pipe, evaluator: Evaluator, pairs: Sequence[EditPair]) -> float:
    """Share of `pairs` whose sampled result the evaluator names as the pair's target (shape, colour, size)."""
    results = sample_edits(pipe, [pair.control for pair in pairs], [pair.instruction for pair in pairs])
    verdicts = evaluator.classify(results)
    return sum(matches(verdict, pair.target_labels) for verdict, pair in zip(verdicts, pairs)) / len(pairs)


def held_out_pairs(n: int = metrics.MIN_SAMPLES, edit: Edit = HELD_OUT_EDIT) -> list[EditPair]:
    """`n` fresh controls for `edit` (every base shape it changes, all colours and sizes) and their targets."""
    return sample_edit_pairs(n, FIDELITY_SEED, edits=(edit,))


def known_pairs(n: int = metrics.MIN_SAMPLES, edits: Sequence[Edit] = KNOWN_EDITS) -> list[EditPair]:
    """At least `n` fresh pairs, the same number for each of `edits` (11 x 19 = 209 by default)."""
    per_edit = -(-n // len(edits))
    return [pair for edit in edits for pair in sample_edit_pairs(per_edit, f"{KNOWN_SEED}: {edit.instruction}",
                                                                 edits=(edit,))]


def edit_fidelity(pipe, evaluator: Evaluator, n: int = metrics.MIN_SAMPLES, edit: Edit = HELD_OUT_EDIT) -> float:
    """Share of `n` results of the held-out instruction on fresh controls that the evaluator judges right."""
    return share_right(pipe, evaluator, held_out_pairs(n, edit))


def known_edit_accuracy(pipe, evaluator: Evaluator, n: int = metrics.MIN_SAMPLES) -> float:
    """Share of results of the base's own edits (each equally, at least `n` in all) judged right."""
    return share_right(pipe, evaluator, known_pairs(n))


def drift_points(before: float, after: float) -> float:
    """Known-edit accuracy lost by a fine-tune, in points (0.95 -> 0.92 is 3.0); negative when it rose."""
    return 100.0 * (before - after)


def report(pipe, evaluator: Evaluator, known_before: float | None = None) -> dict[str, float]:
    """edit_fidelity and known_edit_accuracy at their default counts, and drift_points when `known_before`
    (known_edit_accuracy of the pipeline before fine-tuning) is given."""
    figures = {"edit_fidelity": edit_fidelity(pipe, evaluator),
               "known_edit_accuracy": known_edit_accuracy(pipe, evaluator)}
    if known_before is not None:
        figures["drift_points"] = drift_points(known_before, figures["known_edit_accuracy"])
    return figures
