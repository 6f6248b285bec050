"""Measure the shipped (or any) shapes-world base and evaluator against the world's targets.

    python data_examples/shapes/measure_base.py [--base unet|transformer|FOLDER]   # default: unet

Prints: the evaluator's ground-truth accuracy (fresh images, all 8 shapes); the base's accuracy on its 36
prompts; the bare base's concept and prompt fidelity for both concepts (should be ~0: nothing is taught yet);
how often "a green diamond" and sized prompts come out big (known_look must be within the base's reach, and
size words must steer size); and how well the autoencoder carries base and held-out shapes (what any method
can hope to draw at best).
"""
from __future__ import annotations

import argparse
import os
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see train_base.py; must precede the torch import

import torch

from finetune.shapes import metrics
from finetune.shapes.concepts import CONCEPTS
from finetune.shapes.evaluator import HEADS, Evaluator, ground_truth_accuracy, images_to_pixels
from finetune.shapes.paths import base_path
from finetune.shapes.world import BASE_SHAPES, HELD_OUT_SHAPES, sample_dataset


def timed(label: str, compute):
    started = time.perf_counter()
    value = compute()
    print(f"{label}: {value} ({time.perf_counter() - started:.1f}s)", flush=True)
    return value


@torch.no_grad()
def autoencoder_round_trip(pipe, evaluator: Evaluator, shapes, n: int = 400, seed: int = 99) -> dict[str, float]:
    samples = sample_dataset(n, seed, shapes=shapes)
    pixels = images_to_pixels([image for image, _, _ in samples])
    decoded = pipe.vae.decode(pipe.vae.encode(pixels).latent_dist.mode()).sample
    verdicts = evaluator.classify(pipe.image_processor.postprocess(decoded, output_type="pil"))
    return {name: sum(v[name] == labels[name] for v, (_, _, labels) in zip(verdicts, samples)) / n for name in HEADS}


def main(argv: list[str] | None = None) -> None:
    from finetune.shapes.evaluate import load_base_pipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=None, help="unet (default), transformer, or a pipeline folder")
    parser.add_argument("--evaluator", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    evaluator = Evaluator.load(args.evaluator)
    timed("evaluator ground truth (4000 fresh images, all 8 shapes)",
          lambda: ground_truth_accuracy(evaluator, n=4000, seed=424242))
    pipe = load_base_pipeline(base_path(args.base))
    timed("base_vocabulary_accuracy (36 prompts x 6)", lambda: metrics.base_vocabulary_accuracy(pipe, evaluator))
    for concept in CONCEPTS.values():
        timed(f"bare base {concept.name} concept_fidelity ({concept.concept_prompt()!r} x 32)",
              lambda: metrics.concept_fidelity(pipe, evaluator, concept))
        timed(f"bare base {concept.name} prompt_fidelity", lambda: metrics.prompt_fidelity(pipe, evaluator, concept))
    # the known look must be within the base's reach, and size words must steer size (half the captions
    # name it), so that a learned word can reach "big" too
    for prompt in ("a green diamond", "a big green diamond", "a big red diamond", "a small red diamond"):
        verdicts = evaluator.classify(metrics.sample(pipe, [prompt], 32, seed=7))
        print(f"{prompt!r} x 32:", dict(Counter(f"{v['size']} {v['colour']} {v['shape']}" for v in verdicts)))
    for label, shapes in (("base", BASE_SHAPES), ("held-out", HELD_OUT_SHAPES)):
        print(f"autoencoder round trip, {label} shapes:", autoencoder_round_trip(pipe, evaluator, shapes))


if __name__ == "__main__":
    main()
