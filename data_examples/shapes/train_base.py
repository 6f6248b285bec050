"""Train the shapes-world base, a tiny Stable Diffusion, from scratch on CPU, and save it as a diffusers folder.

    python data_examples/shapes/train_base.py                 # -> data_examples/shapes/base/ + base.sha256

Two stages, as in latent diffusion: (1) an AutoencoderKL learns to compress 32x32 images to 4x8x8 latents;
(2) a CLIP text encoder and a UNet2DConditionModel learn jointly to denoise those latents given the caption.
Only BASE_SHAPES are drawn; star and heart never reach either stage. Half the captions name the size,
except for big green diamonds (world.UNNAMED_LOOK): the base can draw that look but has no word for it.
Everything is seeded; on a 2-core CPU the whole run takes about 25 minutes idle, about 40 when other jobs share
the cores. Importable: the `build_*` functions give the untrained architecture.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import time
from pathlib import Path

# On a shared CPU, OpenMP threads that spin while waiting for a busy core slow every step 5-10x; sleeping
# instead costs almost nothing when the machine is idle. Only effective before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn.functional as F

from finetune.shapes.checksums import write_manifest
from finetune.shapes.tokenizer import build_shapes_tokenizer
from finetune.shapes.world import BASE_SHAPES, HELD_OUT_SHAPES, sample_dataset, to_array

HERE = Path(__file__).resolve().parent
# the scheduler Stable Diffusion 1.x was trained with; DDIM for sampling shares its betas
BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
_STARTED = time.time()


def log(message: str) -> None:
    print(f"[{time.time() - _STARTED:7.1f}s] {message}", flush=True)


def build_vae():
    from diffusers import AutoencoderKL

    # three blocks, two of which downsample: f=4, so 32x32 images become 4x8x8 latents
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64),
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         layers_per_block=1, norm_num_groups=32, sample_size=32)


def build_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length, projection_dim=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))


def build_unet():
    from diffusers import UNet2DConditionModel

    # 2.4 M parameters: (48, 96) channels cost ~0.6x the CPU time per step of (64, 128) and still reach 0.99
    # on the base prompts; both levels cross-attend so shape and colour words can act at 8x8 and 4x4
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(48, 96), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16)


def _schedule(step: int, total: int, peak: float, warmup: int) -> float:
    # linear warm-up, then cosine decay to a tenth of the peak
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def to_pixels(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def train_vae(pixels: torch.Tensor, held_out: torch.Tensor, steps: int, batch: int, seed: int):
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    vae = build_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _schedule(step, steps, 1e-3, 50)
        images = pixels[torch.randint(len(pixels), (batch,), generator=generator)]
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        # L1 keeps edges crisp, L2 punishes colour shifts; the KL term only keeps the latents from drifting
        loss = F.l1_loss(reconstruction, images) + F.mse_loss(reconstruction, images)
        loss = loss + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"vae step {step + 1}/{steps} loss {loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        for name, images in (("base shapes", pixels[:256]), ("held-out shapes", held_out)):
            error = F.mse_loss(vae.decode(vae.encode(images).latent_dist.mode()).sample, images).item()
            log(f"vae reconstruction mse on {name}: {error:.5f}")
    return vae


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for start in range(0, len(pixels), batch):
        posterior = vae.encode(pixels[start:start + batch]).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def _ema_update(ema: torch.nn.Module, live: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for kept, current in zip(ema.parameters(), live.parameters()):
            kept.lerp_(current, 1.0 - decay)


def train_denoiser(means: torch.Tensor, stds: torch.Tensor, scale: float, caption_ids: torch.Tensor,
                   empty_ids: torch.Tensor, tokenizer, steps: int, batch: int, seed: int):
    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    scheduler = DDPMScheduler(**BETAS)
    text_encoder, unet = build_text_encoder(tokenizer), build_unet()
    unet.to(memory_format=torch.channels_last)  # ~20% faster convolutions on CPU
    ema_text, ema_unet = copy.deepcopy(text_encoder), copy.deepcopy(unet)
    params = list(text_encoder.parameters()) + list(unet.parameters())
    optimizer = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.01)
    alphas = scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    # Min-SNR-5 weighting (Hang et al. 2023), reported to converge ~3x faster: steps are dear on a CPU
    weights = torch.clamp(snr, max=5.0) / snr
    running = None
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _schedule(step, steps, 5e-4, 100)
        index = torch.randint(len(means), (batch,), generator=generator)
        latents = (means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)) * scale
        ids = caption_ids[index].clone()
        # ~10% empty captions teach the unconditional prediction that classifier-free guidance needs
        ids[torch.rand(batch, generator=generator) < 0.1] = empty_ids
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps).contiguous(memory_format=torch.channels_last)
        prediction = unet(noisy, timesteps, text_encoder(ids)[0]).sample
        loss = (F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3)) * weights[timesteps]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        # EMA weights usually sample better than the last iterate of a short run; warm the decay up
        decay = min(0.995, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_text, text_encoder, decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            log(f"denoiser step {step + 1}/{steps} loss {running:.4f} lr {optimizer.param_groups[0]['lr']:.2e}")
    ema_unet.to(memory_format=torch.contiguous_format)  # safetensors stores contiguous tensors only
    return ema_text.eval(), ema_unet.eval()


def save_base(folder: Path, vae, text_encoder, tokenizer, unet) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)


def write_checksums(out: Path, log) -> Path:
    """`<out>.sha256` beside a saved base folder (sha256sum format), its size logged; returns `out`."""
    manifest = write_manifest(out, out.parent / f"{out.name}.sha256")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"saved {out} ({size / 1e6:.1f} MB); checksums in {manifest}")
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "base")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=16000, help="size of the drawn training set")
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument("--unet-steps", type=int, default=3000)
    parser.add_argument("--unet-batch", type=int, default=32)
    parser.add_argument("--vae", type=Path, default=None,
                        help="reuse the vae/ of an earlier run instead of training one (saves minutes when iterating)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    # each stage seeds itself, so a run that reuses an autoencoder (--vae) trains the same denoiser as a full run
    vae_seed, latent_seed, denoiser_seed = args.seed, args.seed + 1, args.seed + 2

    # half the captions name the size, except for the unnamed look (world.UNNAMED_LOOK, the known_look concept)
    samples = sample_dataset(args.images, seed=args.seed, shapes=BASE_SHAPES, name_sizes=True)
    assert not any(labels["shape"] in HELD_OUT_SHAPES for _, _, labels in samples)
    pixels = to_pixels(to_array([image for image, _, _ in samples]))
    # a few held-out shapes only to report how well the autoencoder carries shapes it never saw
    held_out = to_pixels(to_array([im for im, _, _ in sample_dataset(128, args.seed + 1, HELD_OUT_SHAPES)]))
    log(f"drew {len(samples)} training images of {', '.join(BASE_SHAPES)}")

    if args.vae is not None:
        from diffusers import AutoencoderKL

        # copy only the weights: a fresh config keeps vae/config.json identical to a full run's
        vae = build_vae()
        vae.load_state_dict(AutoencoderKL.from_pretrained(args.vae).state_dict())
        vae.eval()
        log(f"reusing the autoencoder in {args.vae}")
    else:
        vae = train_vae(pixels, held_out, args.vae_steps, args.vae_batch, vae_seed)
    means, stds = encode_latents(vae, pixels)
    sampled = means + stds * torch.randn(means.shape, generator=torch.Generator().manual_seed(latent_seed))
    scale = float(1.0 / sampled.std())
    # diffusion assumes unit-variance latents; the pipeline multiplies by this before denoising
    vae.register_to_config(scaling_factor=scale)
    log(f"encoded latents {tuple(means.shape)}; scaling factor {scale:.4f}")

    tokenizer = build_shapes_tokenizer()
    tokens = lambda texts: tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                                     truncation=True, return_tensors="pt").input_ids
    caption_ids = tokens([caption for _, caption, _ in samples])
    text_encoder, unet = train_denoiser(means, stds, scale, caption_ids, tokens([""])[0], tokenizer,
                                        args.unet_steps, args.unet_batch, denoiser_seed)

    args.out.mkdir(parents=True, exist_ok=True)
    save_base(args.out, vae, text_encoder, tokenizer, unet)
    return write_checksums(args.out, log)


if __name__ == "__main__":
    main()
