"""Train the shapes world's second base, a tiny Stable Diffusion 3 (an MMDiT trained with flow matching), on CPU,
and save it as a diffusers StableDiffusion3Pipeline folder.

    python data_examples/shapes/train_transformer_base.py     # -> data_examples/shapes/transformer_base/ + .sha256

The same classes as SD3.5 (`SD3Transformer2DModel` with RMS q/k norms, two `CLIPTextModelWithProjection`
encoders as CLIP-L and CLIP-G, no T5, `FlowMatchEulerDiscreteScheduler`), so every demo run on it goes through the
`sd3` family code users run on the real model. The autoencoder is the U-Net base's (base/vae, itself reproduced
from its seed by train_base.py), given SD3's latent shift and scale; the two CLIPs and the transformer learn
jointly from scratch on the same drawn world (star and heart held out; the big green diamond's size never named),
a fifth of the captions without their colour word (COLOURLESS_SHARE).

Conditioning is the pipeline's own (StableDiffusion3Pipeline.encode_prompt without T5): both CLIPs' penultimate
states side by side, then the zeros the pipeline puts in T5's place (256 tokens, its default max_sequence_length),
so `pipe(prompt)` sees at inference what training saw. Objective: sigma ~ logit-normal(0, 1) (SD3's), no shift
at this size (8x8 latents), velocity target, 10% empty captions for classifier-free guidance, EMA weights.
The learning rate is constant after warm-up, so the EMA weights saved at step N (--every) equal a run with
--steps N. Everything is seeded.
"""
from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see train_base.py; must precede the torch import

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from train_base import encode_latents, to_pixels, write_checksums  # noqa: E402  (the U-Net base's script)

from finetune.shapes.tokenizer import build_shapes_tokenizer  # noqa: E402
from finetune.shapes.world import BASE_SHAPES, HELD_OUT_SHAPES, sample_dataset, to_array  # noqa: E402

CLIP_WIDTH = 64  # each CLIP; side by side they are the transformer's 128-wide context (joint_attention_dim)
T5_TOKENS = 256  # the zero tokens StableDiffusion3Pipeline puts in T5's place (its default max_sequence_length)
# Share of captions that leave the colour out ("a circle", "a big circle"). Measured on this transformer trained
# on coloured captions only (step 1,000): a prompt without a colour word drew the wrong shape ("a diamond": 8
# circles and 4 diamonds in 16 samples; after LoRA on the stars, "a sks" drew 16 of 16 big purple squares while
# "a red sks" drew red stars), and the demo's concept prompts ("a sks", "a ohwx") name no colour. The U-Net base
# did not need it.
COLOURLESS_SHARE = 0.2
_STARTED = time.time()


def log(message: str) -> None:
    print(f"[{time.time() - _STARTED:7.1f}s] {message}", flush=True)


def build_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    # three layers: the pipeline reads the penultimate state, so the last layer feeds only the pooled projection
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=CLIP_WIDTH, intermediate_size=4 * CLIP_WIDTH, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length, projection_dim=CLIP_WIDTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))


def build_transformer():
    from diffusers import SD3Transformer2DModel

    # 2.3 M parameters: 4 joint blocks of 4 heads x 32 on the 8x8 latents, one token per latent pixel (patch 1)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=2 * CLIP_WIDTH, caption_projection_dim=128,
        pooled_projection_dim=2 * CLIP_WIDTH, pos_embed_max_size=8, qk_norm="rms_norm")


def conditioning(encoders, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What StableDiffusion3Pipeline.encode_prompt gives without T5, with gradients: ([batch, 16 + 256, 128],
    [batch, 128])."""
    states, pooled = [], []
    for encoder in encoders:
        out = encoder(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled.append(out[0])
    clip = torch.cat(states, dim=-1)
    zeros = clip.new_zeros(clip.shape[0], T5_TOKENS, clip.shape[-1])
    return torch.cat([clip, zeros], dim=-2), torch.cat(pooled, dim=-1)


def _ema_update(ema: torch.nn.Module, live: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for kept, current in zip(ema.parameters(), live.parameters()):
            kept.lerp_(current, 1.0 - decay)


def assemble(vae, encoders, tokenizer, transformer):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=vae,
        text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1], tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def train(vae, latents: torch.Tensor, caption_ids: torch.Tensor, empty_ids: torch.Tensor, tokenizer, args,
          checkpoint) -> None:
    torch.manual_seed(args.seed + 2)
    generator = torch.Generator().manual_seed(args.seed + 2)
    encoders = [build_text_encoder(tokenizer), build_text_encoder(tokenizer)]
    transformer = build_transformer()
    live = torch.nn.ModuleList([*encoders, transformer])
    ema = copy.deepcopy(live).eval()
    optimizer = torch.optim.AdamW(live.parameters(), lr=args.lr, weight_decay=0.01)
    log(f"transformer {sum(p.numel() for p in transformer.parameters()) / 1e6:.2f} M parameters, "
        f"text encoders {sum(p.numel() for e in encoders for p in e.parameters()) / 1e6:.2f} M")
    running = None
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 200)
        index = torch.randint(len(latents), (args.batch,), generator=generator)
        x0 = latents[index]
        ids = caption_ids[index].clone()
        ids[torch.rand(args.batch, generator=generator) < 0.1] = empty_ids
        noise = torch.randn(x0.shape, generator=generator)
        sigma = torch.sigmoid(torch.randn(args.batch, generator=generator)).view(-1, 1, 1, 1)
        noisy = (1 - sigma) * x0 + sigma * noise
        embeds, pooled = conditioning(encoders, ids)
        velocity = transformer(hidden_states=noisy, timestep=sigma.flatten() * 1000, encoder_hidden_states=embeds,
                               pooled_projections=pooled, return_dict=False)[0]
        loss = F.mse_loss(velocity, noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(live.parameters(), 1.0)
        optimizer.step()
        _ema_update(ema, live, min(args.ema, (1 + step) / (10 + step)))
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == args.steps - 1:
            log(f"step {step + 1}/{args.steps} loss {running:.4f}")
        if (step + 1) % args.every == 0 or step == args.steps - 1:
            checkpoint(step + 1, assemble(vae, list(ema[:2]), tokenizer, ema[2]))


def main(argv: list[str] | None = None) -> Path:
    from diffusers import AutoencoderKL

    from finetune.shapes import metrics
    from finetune.shapes.evaluator import Evaluator

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "transformer_base")
    parser.add_argument("--vae", type=Path, default=HERE / "base" / "vae", help="the autoencoder to reuse")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=16000, help="size of the drawn training set")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--ema", type=float, default=0.998)
    parser.add_argument("--every", type=int, default=1000, help="save and measure the EMA weights this often")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)

    samples = sample_dataset(args.images, seed=args.seed, shapes=BASE_SHAPES, name_sizes=True)
    assert not any(labels["shape"] in HELD_OUT_SHAPES for _, _, labels in samples)
    pixels = to_pixels(to_array([image for image, _, _ in samples]))
    vae = AutoencoderKL.from_pretrained(args.vae).eval()
    means, stds = encode_latents(vae, pixels)
    sampled = means + stds * torch.randn(means.shape, generator=torch.Generator().manual_seed(args.seed + 1))
    # SD3 normalises latents as (z - shift_factor) * scaling_factor: zero mean, unit variance here
    shift, scale = float(sampled.mean()), float(1.0 / sampled.std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    latents = (sampled - shift) * scale
    log(f"{len(samples)} images of {', '.join(BASE_SHAPES)} -> latents {tuple(latents.shape)}; "
        f"shift {shift:.4f}, scale {scale:.4f}")

    dropping = random.Random(f"colourless captions {args.seed}")
    captions = [text.replace(f" {labels['colour']} ", " ") if dropping.random() < COLOURLESS_SHARE else text
                for _, text, labels in samples]
    tokenizer = build_shapes_tokenizer()
    tokens = lambda texts: tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                                     truncation=True, return_tensors="pt").input_ids
    evaluator = Evaluator.load()

    def checkpoint(step: int, pipe) -> None:
        folder = args.out if step == args.steps else args.out.with_name(f"{args.out.name}-step{step}")
        pipe.save_pretrained(folder, safe_serialization=True)
        accuracy = metrics.base_vocabulary_accuracy(pipe, evaluator)
        log(f"step {step}: base accuracy {accuracy:.3f} (36 prompts x 2); saved {folder}")

    train(vae, latents, tokens(captions), tokens([""])[0], tokenizer, args, checkpoint)
    return write_checksums(args.out, log)


if __name__ == "__main__":
    main()
