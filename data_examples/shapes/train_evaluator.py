"""Train the shapes-world evaluator (finetune.shapes.evaluator) and ship it as evaluator.safetensors.

    python data_examples/shapes/train_evaluator.py     # ~2-4 min on a 2-core CPU; prints test accuracy

It learns from freshly drawn images of all eight shapes, held-out ones included, in every colour and size.
Light noise, blur and colour shifts during training make it tolerant of the soft edges and slight tints of
generated samples, which are what it will judge.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

# spinning OpenMP threads slow a shared CPU 5-10x (see train_base.py); must be set before torch loads
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F

from finetune.shapes.checksums import sha256_of
from finetune.shapes.evaluator import DEFAULT_CONFIG, HEADS, Evaluator, ShapeJudge, ground_truth_accuracy
from finetune.shapes.world import ALL_SHAPES, sample_dataset, to_array

HERE = Path(__file__).resolve().parent


def _blur(pixels: torch.Tensor) -> torch.Tensor:
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    kernel = kernel.expand(3, 1, 3, 3)
    return F.conv2d(F.pad(pixels, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)


def augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    n = len(pixels)
    amount = torch.rand(n, 1, 1, 1, generator=generator)
    blurred = torch.lerp(pixels, _blur(pixels), amount * (torch.rand(n, 1, 1, 1, generator=generator) < 0.5))
    tint = (torch.rand(n, 3, 1, 1, generator=generator) - 0.5) * 0.16  # about +-10 of 255 per channel
    noise = torch.randn(pixels.shape, generator=generator) * 0.1 * torch.rand(n, 1, 1, 1, generator=generator)
    return (blurred + tint + noise).clamp(-1.0, 1.0)


def _labels(samples, config: dict) -> dict[str, torch.Tensor]:
    return {name: torch.tensor([config[name].index(labels[name]) for _, _, labels in samples]) for name in HEADS}


def train(steps: int, batch: int, pool: int, seed: int) -> Evaluator:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    config = dict(DEFAULT_CONFIG)
    samples = sample_dataset(pool, seed, shapes=ALL_SHAPES)
    pixels = torch.from_numpy(to_array([im for im, _, _ in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1
    targets = _labels(samples, config)
    model = ShapeJudge(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    started = time.time()
    for step in range(steps):
        lr = 2e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = torch.randint(pool, (batch,), generator=generator)
        outputs = model(augment(pixels[index], generator))
        loss = sum(F.cross_entropy(outputs[name], targets[name][index]) for name in HEADS)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"[{time.time() - started:6.1f}s] step {step + 1}/{steps} loss {loss.item():.4f}", flush=True)
    return Evaluator(model, config)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "evaluator.safetensors")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--pool", type=int, default=24000, help="number of drawn training images")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    evaluator = train(args.steps, args.batch, args.pool, args.seed)
    evaluator.save(args.out)
    # a fresh seed: these test images were never seen in training
    accuracy = ground_truth_accuracy(Evaluator.load(args.out), n=4000, seed=args.seed + 1_000_003)
    print("ground-truth accuracy on 4000 fresh images of all 8 shapes: "
          + ", ".join(f"{name} {value:.4f}" for name, value in accuracy.items()), flush=True)
    checksum = args.out.with_suffix(".sha256")
    checksum.write_text(f"{sha256_of(args.out)}  {args.out.name}\n")
    print(f"saved {args.out} ({args.out.stat().st_size / 1e6:.2f} MB); checksum in {checksum}")
    return args.out


if __name__ == "__main__":
    main()
