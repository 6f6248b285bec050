"""Shapes-world metrics: sample a pipeline, let the evaluator name what it drew, count what is right.

Sampling is fixed so that numbers are comparable across methods and runs: 20 steps, guidance 4, 32x32, and
starting noise drawn for all images up front from one seed (so batching does not change any image). The sampler
is DDIM for a DDPM-trained base (the U-Net) and the flow-matching Euler sampler for a flow-matching one (the
transformer), each built from the pipeline's own scheduler config, whatever scheduler an artifact brings.

Default counts, chosen so one adapter's full report takes well under a minute on a 2-core CPU:
- base_vocabulary_accuracy: 36 base prompts x 2 images = 72 samples (one sample moves it by 1.4 points);
- concept_fidelity: 32 samples of the concept prompt (about +-8 points of sampling noise at p = 0.5);
- prompt_fidelity: 8 samples for each composed prompt, 48 for new_object's six colours.
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
BATCH_IMAGES = 64  # images per pipeline call; twice that many go through the U-Net with guidance
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
        per_call = max(1, BATCH_IMAGES // images_per_prompt)
        for start in range(0, len(prompts), per_call):
            chunk = list(prompts[start:start + per_call])
            latents = noise[start * images_per_prompt:(start + len(chunk)) * images_per_prompt]
            images += pipe(prompt=chunk, num_images_per_prompt=images_per_prompt, num_inference_steps=STEPS,
                           guidance_scale=GUIDANCE, height=height, width=height, output_type="pil",
                           latents=latents.to(pipe.device, denoiser_of(pipe).dtype)).images
    finally:
        pipe.scheduler = kept_scheduler
    return images


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


def base_vocabulary_accuracy(pipe, evaluator: Evaluator, images_per_prompt: int = 2) -> float:
    """Share of samples of "a {colour} {shape}" (all 36) with the right shape and colour; drift shows here."""
    expectations = [{"colour": prompt.split()[1], "shape": prompt.split()[2]} for prompt in BASE_PROMPTS]
    return _share_matching(pipe, evaluator, BASE_PROMPTS, expectations, images_per_prompt, BASE_SEED)


def concept_fidelity(pipe, evaluator: Evaluator, concept: Concept, n: int = 32, token: str | None = None) -> float:
    """Share of `n` samples of the concept prompt ("a sks") that the evaluator recognises as the concept."""
    return _share_matching(pipe, evaluator, [concept.concept_prompt(token)], [concept.expected], n, CONCEPT_SEED)


def prompt_fidelity(pipe, evaluator: Evaluator, concept: Concept, n: int = 8, token: str | None = None) -> float:
    """Share of samples of the composed prompts ("a red sks", ...; `n` each) with the right colour and shape."""
    composed = concept.composed_prompts(token)
    prompts, expectations = zip(*composed)
    return _share_matching(pipe, evaluator, prompts, expectations, n, COMPOSED_SEED)


def report(pipe, evaluator: Evaluator, concept: Concept, token: str | None = None) -> dict[str, float]:
    """All three metrics with their default counts."""
    return {
        "base_vocabulary_accuracy": base_vocabulary_accuracy(pipe, evaluator),
        "concept_fidelity": concept_fidelity(pipe, evaluator, concept, token=token),
        "prompt_fidelity": prompt_fidelity(pipe, evaluator, concept, token=token),
    }
