"""Shapes-world metrics: sample a pipeline, let the evaluator name what it drew, count what is right.

Sampling is fixed so that numbers are comparable across methods and runs: 20 steps, guidance 4, 32x32, and
starting noise drawn for all images up front from one seed (so batching does not change any image). The sampler
is DDIM for a DDPM-trained base (the U-Net) and the flow-matching Euler sampler for a flow-matching one (the
transformer), each built from the pipeline's own scheduler config, whatever scheduler an artifact brings.

Default counts: at least MIN_SAMPLES (200) samples behind every figure, so that one sample moves a figure by at
most 0.5 points (a fidelity by 0.005, the drop by 0.5) and a target is not met or missed by one sample:
- base_vocabulary_accuracy: 36 base prompts x 6 images = 216 samples (0.46 points each);
- concept_fidelity: 200 samples of the concept prompt;
- prompt_fidelity: 200 samples split evenly over the composed prompts (34 x 6 colours = 204 for new_object,
  40 x 5 = 200 for known_look).
One adapter's three figures take about 20 s on the U-Net base and about 3 minutes on the transformer base on a
2-core CPU (the transformer's 272 text tokens per prompt make each sample dearer; measured 2026-12-07); at the
earlier 72 / 32 / 48 samples they took about 5 s and 40 s.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from finetune.models.base import denoiser_of
from finetune.shapes.concepts import BASE_PROMPTS, Concept, Expectation, matches
from finetune.shapes.evaluator import Evaluator

STEPS = 20
GUIDANCE = 4.0
BATCH_IMAGES = 64  # images per pipeline call at most; twice that many go through the denoiser with guidance
MIN_SAMPLES = 200  # behind every figure: one sample is at most 0.5 points
BASE_IMAGES_PER_PROMPT = 6  # x 36 base prompts = 216
BASE_SEED, CONCEPT_SEED, COMPOSED_SEED = 0, 1, 2


@torch.no_grad()
def sample(pipe, prompts: Sequence[str], images_per_prompt: int, seed: int = 0) -> list[Image.Image]:
    """`images_per_prompt` images for each prompt, prompt-major, with the fixed sampling settings."""
    height = denoiser_of(pipe).config.sample_size * pipe.vae_scale_factor
    shape = (len(prompts) * images_per_prompt, denoiser_of(pipe).config.in_channels,
             height // pipe.vae_scale_factor, height // pipe.vae_scale_factor)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    kept_scheduler = pipe.scheduler
    pipe.scheduler = judging_scheduler(kept_scheduler)
    pipe.set_progress_bar_config(disable=True)
    images: list[Image.Image] = []
    try:
        for chunk, count in _calls(list(prompts), images_per_prompt):
            latents = noise[len(images):len(images) + len(chunk) * count]
            images += pipe(prompt=chunk, num_images_per_prompt=count, num_inference_steps=STEPS,
                           guidance_scale=GUIDANCE, height=height, width=height, output_type="pil",
                           latents=latents.to(pipe.device, denoiser_of(pipe).dtype)).images
    finally:
        pipe.scheduler = kept_scheduler
    return images


def _calls(prompts: list[str], images_per_prompt: int) -> list[tuple[list[str], int]]:
    """(prompts, images per prompt) of each pipeline call, prompt-major, at most BATCH_IMAGES images each: several
    prompts per call when each has few images, one prompt's images split over calls when it has many (one call
    of 200 images with guidance made the transformer base's samples a third dearer each)."""
    if images_per_prompt <= BATCH_IMAGES:
        per_call = max(1, BATCH_IMAGES // images_per_prompt)
        return [(prompts[start:start + per_call], images_per_prompt) for start in range(0, len(prompts), per_call)]
    return [([prompt], min(BATCH_IMAGES, images_per_prompt - done))
            for prompt in prompts for done in range(0, images_per_prompt, BATCH_IMAGES)]


def judging_scheduler(scheduler):
    """The fixed sampler for a pipeline whose scheduler is `scheduler`: flow-matching Euler for a flow-matching
    base (a DDPM sampler cannot integrate a velocity field), DDIM otherwise; both from its own config."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    if type(scheduler).__name__.startswith("FlowMatch"):
        return FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    return DDIMScheduler.from_config(scheduler.config)


def _share_matching(pipe, evaluator: Evaluator, prompts: Sequence[str], expectations: Sequence[Expectation],
                    images_per_prompt: int, seed: int) -> float:
    images = sample(pipe, prompts, images_per_prompt, seed)
    verdicts = evaluator.classify(images)
    wanted = [expected for expected in expectations for _ in range(images_per_prompt)]
    return sum(matches(verdict, expected) for verdict, expected in zip(verdicts, wanted)) / len(verdicts)


def base_vocabulary_accuracy(pipe, evaluator: Evaluator, images_per_prompt: int = BASE_IMAGES_PER_PROMPT) -> float:
    """Share of samples of "a {colour} {shape}" (all 36) with the right shape and colour; drift shows here."""
    expectations = [{"colour": prompt.split()[1], "shape": prompt.split()[2]} for prompt in BASE_PROMPTS]
    return _share_matching(pipe, evaluator, BASE_PROMPTS, expectations, images_per_prompt, BASE_SEED)


def concept_fidelity(pipe, evaluator: Evaluator, concept: Concept, n: int = MIN_SAMPLES,
                     token: str | None = None) -> float:
    """Share of `n` samples of the concept prompt ("a sks") that the evaluator recognises as the concept."""
    return _share_matching(pipe, evaluator, [concept.concept_prompt(token)], [concept.expected], n, CONCEPT_SEED)


def prompt_fidelity(pipe, evaluator: Evaluator, concept: Concept, n: int | None = None,
                    token: str | None = None) -> float:
    """Share of samples of the composed prompts ("a red sks", ...; `n` each, None: MIN_SAMPLES in all, rounded up
    to a whole number per prompt) with the right colour and shape."""
    composed = concept.composed_prompts(token)
    prompts, expectations = zip(*composed)
    n = n if n is not None else -(-MIN_SAMPLES // len(prompts))
    return _share_matching(pipe, evaluator, prompts, expectations, n, COMPOSED_SEED)


def report(pipe, evaluator: Evaluator, concept: Concept, token: str | None = None) -> dict[str, float]:
    """All three metrics with their default counts."""
    return {
        "base_vocabulary_accuracy": base_vocabulary_accuracy(pipe, evaluator),
        "concept_fidelity": concept_fidelity(pipe, evaluator, concept, token=token),
        "prompt_fidelity": prompt_fidelity(pipe, evaluator, concept, token=token),
    }
