"""FLOPs of one training step, counted by torch.utils.flop_counter, and model-FLOPs utilisation on a GPU.

Counts, per sample: the denoiser's forward and backward with the recipe's trainable weights (LoRA or the whole
denoiser), one VAE encode, one text encode; so what a step costs with the caches (the denoiser alone) and without
them (for flux, the released T5-XXL and CLIP-L counted on the meta device: the benchmark's are stand-ins). On a GPU
it then times the denoiser's forward and backward in bf16 at the batch size and reports achieved
TFLOP/s and MFU, the share of the GPU's peak dense bf16 rate (`--peak-tflops`, or a table of known GPUs).

    python benchmarks/flops.py --model sd15
    python benchmarks/flops.py --model sd15 --batch-size 8 --json flops.json     # on a GPU: MFU too
    python benchmarks/flops.py --model sdxl                                      # counted in bf16 on a CPU
    python benchmarks/flops.py --model flux                                      # Flux.1-dev's width, fewer blocks
    python benchmarks/flops.py --model sdxl --batch-size 8 --compile blocks      # on a GPU: MFU compiled
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from finetune.io.atomic import write_text_atomically  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

# dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, by a substring of the device name
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0,
                    "L40S": 362.0, "L4": 121.0, "A10G": 125.0, "RTX 4090": 165.0, "RTX 3090": 71.0}


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny, sd15, sdxl or flux")
    parser.add_argument("--strategy", default="lora", choices=("lora", "dreambooth"))
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank")
    parser.add_argument("--resolution", type=int, default=None,
                        help="default: 512 for sd15, sdxl and flux, 32 for tiny")
    parser.add_argument("--batch-size", type=int, default=1, help="for the GPU timing")
    parser.add_argument("--steps", type=int, default=10, help="timed GPU steps (after 3 untimed)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="for the GPU timing")
    parser.add_argument("--compile", choices=("off", "blocks", "full", "max"), default="off",
                        help="for the GPU timing: the denoiser compiled as train.compile does (training/compile.py); "
                             "the compile time is reported apart")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's peak bf16 TFLOP/s")
    parser.add_argument("--json", help="also write the figures to this file")
    return parser.parse_args()


def _count(fn) -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # the math backend spells attention out as matmuls, which the counter sees; fused CPU kernels it would miss
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _extra(added) -> dict:
    return {} if added is None else {"added_cond_kwargs": added}


def main() -> None:
    from benchmarks.models import DEFAULT_MIXED_PRECISION, DEFAULT_RESOLUTION, model_folder
    from finetune.models import family_for
    from finetune.training.run import DTYPES

    args = _arguments()
    resolution = args.resolution or DEFAULT_RESOLUTION[args.model]
    folder = args.folder = str(model_folder(args.model))
    family = family_for("auto", folder)
    # counts do not depend on the dtype; SDXL in fp32 (14 GB) would not fit a small machine
    dtype = DTYPES.get(DEFAULT_MIXED_PRECISION.get(args.model, "fp32"))
    parts = family.load(folder, dtype=dtype)
    model = parts.denoiser
    if args.strategy == "lora":
        from peft import LoraConfig

        from finetune.networks import peft_layers

        peft_layers.inject(model, LoraConfig(r=args.rank, lora_alpha=args.rank,
                                             target_modules=list(family.lora_targets)))
    else:
        model.requires_grad_(True)
    # the denoiser's loss as the step-time floor computes it, for a batch on a device
    loss_of = (_transformer_loss if args.model == "flux" else _unet_loss)(model, parts, resolution, dtype)
    pixels = torch.rand(1, 3, resolution, resolution) * 2 - 1

    unet_flops = _count(lambda: loss_of(1, torch.device("cpu")).backward())
    with torch.no_grad():
        vae_flops = _count(lambda: family.encode_image_moments(parts, pixels))
        # the flux benchmark's text encoders are one-layer stand-ins: count the released T5-XXL and CLIP-L
        text_flops = _count(_released_flux_text_encoders() if args.model == "flux" else
                            lambda: family.encode_prompts(parts, ["a photo of a blue ball"]))
    name = "transformer" if args.model == "flux" else "U-Net"
    figures = {"model": args.model, "strategy": args.strategy, "resolution": resolution,
               "unet_fwd_bwd_tflop_per_sample": unet_flops / 1e12, "vae_encode_tflop_per_sample": vae_flops / 1e12,
               "text_encode_tflop_per_sample": text_flops / 1e12,
               "step_tflop_per_sample_cached": unet_flops / 1e12,
               "step_tflop_per_sample_uncached": (unet_flops + vae_flops + text_flops) / 1e12}
    figures["uncached_extra_share"] = (vae_flops + text_flops) / unet_flops
    print(f"{args.model}, {args.strategy}, {resolution} px, per sample:")
    for label, key in ((f"{name} forward+backward", "unet_fwd_bwd"), ("VAE encode", "vae_encode"),
                       ("text encode", "text_encode")):
        print(f"  {label:30}{figures[key + '_tflop_per_sample']:.4f} TFLOP")
    print(f"  a step without caches costs {figures['uncached_extra_share']:.0%} more than with them")

    if torch.cuda.is_available():
        figures.update(_gpu_utilisation(model, loss_of, unet_flops, args))
        mfu = f"{figures['mfu']:.1%}" if figures["mfu"] else "unknown (give --peak-tflops)"
        print(f"  GPU {figures['device']}, bf16, batch {args.batch_size}: {figures['gpu_s_per_step']:.4f} s/step, "
              f"{figures['samples_per_s']:.1f} samples/s, {figures['achieved_tflops']:.1f} TFLOP/s, "
              f"MFU {mfu}, peak {figures['gpu_peak_gb']:.2f} GB")
    if args.json:
        print(f"wrote {write_text_atomically(args.json, json.dumps(figures, indent=2))}")


def _unet_loss(unet, parts, resolution: int, dtype):
    from benchmarks.floors import floor_conditioning

    side = resolution // 2 ** (len(parts.vae.config.block_out_channels) - 1)
    latents = torch.randn(1, unet.config.in_channels, side, side)
    # the U-Net's conditioning as the step-time floor gives it (SDXL: also the pooled embedding and size numbers)
    states, added = floor_conditioning(unet.config, parts.text_encoder.config.to_dict(), 1, resolution,
                                       torch.Generator().manual_seed(0))

    def loss_of(batch: int, device):
        extra = _extra(None if added is None else {
            key: value.repeat(batch, 1).to(device, unet.dtype) for key, value in added.items()})
        out = unet(latents.repeat(batch, 1, 1, 1).to(device, unet.dtype), torch.tensor([500] * batch).to(device),
                   states.repeat(batch, 1, 1).to(device, unet.dtype), **extra).sample
        return out.float().pow(2).mean()
    return loss_of


def _transformer_loss(transformer, parts, resolution: int, dtype):
    from benchmarks import flux

    def loss_of(batch: int, device):
        inputs = flux.floor_inputs(transformer.config, batch, resolution, torch.Generator().manual_seed(0))
        return flux.floor_loss(transformer, inputs, torch.Generator().manual_seed(0), device)
    return loss_of


def _released_flux_text_encoders():
    """Encoding one caption with Flux.1-dev's T5-XXL (512 tokens) and CLIP-L (77), built on the meta device."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from benchmarks.flux import config

    with torch.device("meta"):
        t5, clip = T5EncoderModel(T5Config(**config("text_encoder_2"))), CLIPTextModel(
            CLIPTextConfig(**config("text_encoder")))

    def run():
        with torch.device("meta"):
            t5(input_ids=torch.zeros(1, 512, dtype=torch.long))
            clip(input_ids=torch.zeros(1, 77, dtype=torch.long))
    return run


def _gpu_utilisation(model, loss_of, flops_per_sample: int, args) -> dict:
    device = torch.device("cuda")
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    model.zero_grad(set_to_none=True)  # the CPU count's backward left gradients, which .to() would cast to bf16
    model.to(device, dtype=torch.bfloat16)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # trainable weights fp32, as the toolkit keeps them
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    from finetune.models import family_for
    from finetune.training.compile import CompileFigures, compile_denoiser

    compile_denoiser(model, args.compile, family_for("auto", args.folder).spec.compile_blocks)
    before = CompileFigures.now()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)  # as the loop's on CUDA
    batch = args.batch_size
    torch.cuda.reset_peak_memory_stats()
    times = []
    # the attention kernels train.attention: auto allows (the loop's), not PyTorch's bare choice
    from finetune.training.attention import kernels_for, sdpa_kernels

    with sdpa_kernels(kernels_for("auto", device, half_precision=True)[0]):
        _time_steps(model, loss_of, optimizer, batch, device, args.steps, times)
    seconds = statistics.median(times)
    achieved = flops_per_sample * batch / seconds / 1e12
    return {"device": name, "batch_size": batch, "compile": args.compile,
            "compile_s": CompileFigures.now().since(before).seconds, "gpu_s_per_step": seconds,
            "samples_per_s": batch / seconds,
            "achieved_tflops": achieved, "peak_tflops": peak, "mfu": achieved / peak if peak else None,
            "gpu_peak_gb": torch.cuda.max_memory_allocated() / 1e9}


def _time_steps(model, loss_of, optimizer, batch: int, device, steps: int, times: list) -> None:
    """3 untimed steps, then `steps` timed ones, each ended by waiting for the GPU; appends their seconds."""
    for step in range(3 + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_of(batch, device)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= 3:
            times.append(time.perf_counter() - start)


if __name__ == "__main__":
    main()
