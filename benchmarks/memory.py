"""Estimated peak GPU memory of each shipped recipe at the real model sizes. Estimates, not measured on a GPU.

    python benchmarks/memory.py                  # the table
    python benchmarks/memory.py --fsdp 1 2 4 8 --json memory.json

Models: the real transformers, text encoders and VAEs built on the meta device (no weights, nothing downloaded)
from the published config.json values in benchmarks/configs/: black-forest-labs/FLUX.1-dev (flux/),
stabilityai/stable-diffusion-3.5-large and stabilityai/stable-diffusion-3.5-medium (sd35/; CLIP-L, CLIP-G and
T5-XXL as in flux/ and sdxl/), black-forest-labs/FLUX.2-dev and FLUX.2-klein-base-9B (flux2/: Mistral-Small-3.1
and Qwen3-8B), Qwen/Qwen-Image (qwen_image/: Qwen2.5-VL-7B), lodestones/Chroma1-HD (chroma/; T5-XXL and the VAE
of flux/), Alpha-VLLM/Lumina-Image-2.0 (lumina2/: Gemma-2-2B, Flux's VAE), Efficient-Large-Model/
Sana_1600M_1024px_diffusers (sana/: Gemma-2-2B, DC-AE f32c32), HiDream-ai/HiDream-I1-Full (hidream/: CLIP-L,
CLIP-G, T5-XXL, Llama-3.1-8B, Flux's VAE), Krea 2 (krea2/: Qwen3-VL-4B, Qwen-Image's VAE), Qwen/Qwen-Image-2.1
(qwen_image_2_1/: Qwen3-VL-8B, the 16x RGBA VAE). benchmarks/meta_models.py builds them (`MODELS`, `BUILDERS`). A
recipe's peak is the largest of its phases, as training/loop.py runs them:
- caching: the text encoders (base dtype; only the largest with `cache.text_encoders: one_at_a_time`) and the VAE
  (fp32 where `force_upcast`) encode the captions and images;
  the denoiser joins the GPU only afterwards;
- training: the denoiser's frozen weights (base dtype, or one byte per Linear weight with `model.quantize: int8` or
  `fp8`; with `train.offload` less the streamed blocks' weights but the two largest of them, in flight; `int8_w8a8` and `fp8_w8a8` keep the base dtype and make a layer's 8-bit copies as it multiplies, a few
  MB at a time, left out), the trained weights in fp32 with their fp32 gradients and the optimizer's state (AdamW
  8 bytes a weight, adamw8bit 2, Adafactor its row and column factors), the activations, and the encoders or VAE
  still there (a cache off, or `cache.offload: false`);
- sampling (`sample.every` > 0): encoders and VAE come back beside the denoiser and the optimizer state;
- class images (`prior.mode: class_images`): the frozen base draws them, encoders and VAE beside it;
- preparing (DreamBooth): the whole denoiser made fp32 on each GPU before FSDP shards it.
Activations: what backward keeps per block, in bytes per token per unit of width, measured on this CPU on a narrow
copy of each block (benchmarks/activations.py), times the real width, tokens (both streams: (side/16)^2 image tokens
(Qwen-Image 2.1's too: 16x latents, one token per latent pixel), plus the text tokens: Flux's, Flux.2's and Chroma's
512, SD3's 77 + 256, Qwen-Image's and 2.1's caption length, taken at its 512 limit; Lumina 2's 256, HiDream's 3 x
128, Krea 2's 512; Sana's blocks the image's alone: (side/32)^2; an edit recipe's control images add their own
image tokens, `data.control`: they join the target's sequence) and batch (doubled by prior preservation). With
gradient checkpointing each block keeps its inputs and one block at a time holds its full share again. Side: the
recipe's `data.resolution` (buckets keep about its area). The ratios are measured with each family's default LoRA
targets; a `strategy.target_preset` that adds the MLPs keeps more than they say. Text encoders are never trained by
these recipes.
FSDP (`--fsdp`): whole-model weights, gradients and optimizer state divided by N, plus two gathered blocks.
Each phase adds CUDA_CONTEXT_GB (context and cuBLAS workspace; the allocator's fragmentation, often 5-15%, is
not in it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import activations  # noqa: E402
from benchmarks.meta_models import MODELS, Model  # noqa: E402
from benchmarks.meta_models import build as _build  # noqa: E402
from benchmarks.meta_models import model_for as _model_for  # noqa: E402
from benchmarks.meta_models import numel as _numel  # noqa: E402
from benchmarks.meta_models import vae_first_width as _vae_first_width  # noqa: E402
from benchmarks.meta_models import width as _width  # noqa: E402

RECIPES = ("flux_lora", "flux_lora_16gb", "flux_lora_12gb", "qwen_image_lora_24gb", "sd35_lora", "flux_dreambooth_fsdp", "flux2_lora", "flux2_klein_lora",
           "qwen_image_lora", "chroma_lora", "lumina2_lora", "sana_lora", "hidream_lora", "krea2_lora",
           "qwen_image_2_1_lora", "flux_kontext_lora", "flux2_edit_lora")
GB = 1e9
CUDA_CONTEXT_GB = 0.6
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
VAE_WORK_MAPS = 3  # full-resolution fp32 feature maps of the VAE's first stage (128 channels; Qwen's 96) alive at once




def _lora_shapes(denoiser: torch.nn.Module, targets, rank: int) -> list[tuple[int, int]]:
    """The A [rank, in] and B [out, rank] matrices peft adds to each Linear whose name ends in a target."""
    shapes = []
    for name, module in denoiser.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            shapes += [(rank, module.in_features), (module.out_features, rank)]
    return shapes


def _optimizer_bytes(shapes: list[tuple[int, ...]], kind: str) -> float:
    if kind == "adafactor":  # factored second moment: a row and a column vector per matrix, fp32
        return sum(4 * (sum(s) if len(s) == 2 else s[0]) for s in shapes)
    # fp32 state per weight: AdamW's two moments; Prodigy's two, its s and its copy of the initial weights (p0);
    # Lion's one momentum; schedule-free AdamW's z and second moment. Prodigy's p0 is one number for a weight that
    # starts at zero (LoRA's B): an upper bound there
    per_weight = {"adamw": 8, "adamw8bit": 2, "prodigy": 16, "lion": 4, "schedule_free_adamw": 8}
    return per_weight[kind] * sum(_count(s) for s in shapes)


def _count(shape: tuple[int, ...]) -> int:
    n = 1
    for side in shape:
        n *= side
    return n


_RATIOS: dict[str, dict[str, float]] = {}


def ratios(family: str) -> dict[str, float]:
    """Measured once per process: bytes per token per unit of width of each block kind (and "rest")."""
    if family not in _RATIOS:
        _RATIOS[family] = activations.measure(family)
    return _RATIOS[family]


def estimate(recipe, model: Model, fsdp: int = 1) -> dict:
    """For `recipe` (a loaded Recipe) on `model`: {"gb": the peak, "phase": where it is, "phases": {phase: GB},
    "parts": {what the training phase holds: GB}}; `fsdp`: GPUs a whole-model strategy is sharded over."""
    from finetune.data.caches import plan_caches

    denoiser, encoders, vae = _build(model)
    t, strategy = recipe.train, recipe.strategy
    base = recipe.model.dtype if recipe.model.dtype != "auto" else {"no": "fp32"}.get(t.mixed_precision,
                                                                                        t.mixed_precision)
    wbytes = BYTES[base]
    if getattr(recipe.model, "text_encoder_3", None) == "none":
        encoders = [e for e in encoders if "T5" not in type(e).__name__]  # SD3 without T5
    encoder_gb = sum(_numel(e) for e in encoders) * wbytes / GB
    vae_gb = _numel(vae) * (4 if vae.config.get("force_upcast", False) else wbytes) / GB
    side = recipe.data.resolution
    vae_work_gb = VAE_WORK_MAPS * _vae_first_width(vae) * side * side * 4 * t.batch_size / GB
    plan = plan_caches(recipe.cache.latents, recipe.cache.text, recipe.data.crop,
                       strategy.changes_text_encoding(), 0)
    if strategy.kind not in ("lora", "dreambooth"):
        raise ValueError(f"no estimate for strategy {strategy.kind!r} yet (lora and dreambooth have one)")
    parts: dict[str, float] = {}
    if strategy.kind == "dreambooth":  # the whole denoiser trains, in fp32
        shapes = [tuple(p.shape) for p in denoiser.parameters()]
        whole = _numel(denoiser) * 8 + _optimizer_bytes(shapes, t.optimizer)
        gathered = 2 * max(_numel(b) for _, b in activations.block_kinds(denoiser)) * 4 if fsdp > 1 else 0
        parts["weights+grads+optimizer"] = (whole / fsdp + gathered) / GB
    else:
        linear = sum(m.weight.numel() for m in denoiser.modules() if isinstance(m, torch.nn.Linear))
        per_linear = 1 if recipe.model.quantize in ("int8", "fp8") else wbytes  # *_w8a8 store the base dtype
        parts["weights"] = (linear * per_linear + (_numel(denoiser) - linear) * wbytes) / GB
        if t.offload is not None:  # streamed blocks' frozen weights in CPU memory, two of them in flight
            parts["weights"] -= _offloaded_bytes(denoiser, model, t.offload.blocks, per_linear, wbytes) / GB
        shapes = _lora_shapes(denoiser, _lora_targets(recipe, model, denoiser), strategy.rank)
        parts["lora+grads+optimizer"] = (sum(map(_count, shapes)) * 8 + _optimizer_bytes(shapes, t.optimizer)) / GB
    parts["activations"] = _activations_gb(recipe, model, denoiser)
    if not (plan.text and recipe.cache.offload):
        parts["text encoders"] = encoder_gb
    if not (plan.latents != "off" and recipe.cache.offload):
        parts["vae"] = vae_gb + vae_work_gb
    parts["cuda context"] = CUDA_CONTEXT_GB
    frozen_gb = _numel(denoiser) * wbytes / GB
    # cache.text_encoders: one_at_a_time holds the largest encoder while the caches fill, not all of them
    caching_encoders_gb = (encoder_gb if recipe.cache.text_encoders == "together" else
                           max(_numel(e) for e in encoders) * wbytes / GB)
    phases = {"training": sum(parts.values()),
              "caching": caching_encoders_gb + vae_gb + vae_work_gb / t.batch_size + CUDA_CONTEXT_GB}
    if recipe.prior.mode == "class_images":  # the base draws the class images, every part on the GPU
        phases["class images"] = frozen_gb + encoder_gb + vae_gb + vae_work_gb / t.batch_size + CUDA_CONTEXT_GB
    if strategy.kind == "dreambooth":  # made fp32 on the GPU whole, before FSDP shards it
        phases["preparing"] = _numel(denoiser) * 4 / GB + CUDA_CONTEXT_GB
    if recipe.sample.every:  # encoders and VAE back beside the denoiser, its adapters and the optimizer state
        # the gradients counted in `parts` are freed by then (zero_grad(set_to_none)); they stand for the copy of
        # the trained weights in the base dtype that grids draw with (strategy.as_loaded), which is no bigger
        held = sum(v for k, v in parts.items() if k not in ("activations", "text encoders", "vae"))
        phases["sampling"] = held + encoder_gb + vae_gb + vae_work_gb / t.batch_size
    phase = max(phases, key=phases.get)
    return {"gb": phases[phase], "phase": phase, "phases": phases, "parts": parts}


def _offloaded_bytes(denoiser, model: Model, blocks: float, per_linear: int, wbytes: int) -> float:
    """Bytes train.offload keeps off the GPU: the frozen weights of the blocks it streams (the same blocks
    training/block_offload.py chooses), less the two largest of them, on the GPU while they compute or copy."""
    from finetune.models import spec_of
    from finetune.training import block_offload

    def frozen(block) -> float:
        linear = sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))
        return linear * per_linear + (_numel(block) - linear) * wbytes

    sizes = sorted((frozen(b) for b in block_offload.chosen_blocks(denoiser, spec_of(model.family), blocks)),
                   reverse=True)
    return max(0.0, sum(sizes) - sum(sizes[:2]))


def _lora_targets(recipe, model: Model, denoiser) -> list[str]:
    """strategy.target_modules, else its target_preset's modules, else the family's default targets."""
    from finetune.models import family_for
    from finetune.strategies import lora_presets

    strategy = recipe.strategy
    return list(strategy.target_modules or lora_presets.targets(
        family_for(model.family), getattr(strategy, "target_preset", None), denoiser))


def control_tokens(recipe, model: Model) -> int:
    """The image tokens an edit recipe's control images add to each sample (`data.control`; 0 without it): one
    image per control folder (a column's counted as one), each at its target's size (`resize: target`) or
    `data.control.resolution` squared in area (`resize: bucket`)."""
    control = getattr(recipe.data, "control", None)
    if control is None:
        return 0
    side = recipe.data.resolution
    if getattr(control, "resize", "target") == "bucket":
        side = getattr(control, "resolution", None) or side
    return max(1, len(getattr(control, "folders", None) or ())) * (side // model.pixels_per_token) ** 2


def _activations_gb(recipe, model: Model, denoiser) -> float:
    t = recipe.train
    batch = t.batch_size * (2 if recipe.prior.mode != "none" else 1)
    # the target's tokens, then the control images' (edit models append them to the same sequence)
    image_tokens = (recipe.data.resolution // model.pixels_per_token) ** 2 + control_tokens(recipe, model)
    tokens = activations.block_tokens(model.family, image_tokens, model.text_tokens)
    width = _width(denoiser)
    measured = ratios(model.family)
    full = [measured[kind] * tokens * width * batch for kind, _ in activations.block_kinds(denoiser)]
    if t.gradient_checkpointing:
        kept = activations.KEPT_PER_TOKEN_WIDTH * tokens * width * batch * len(full) + max(full)
    else:
        kept = sum(full)
    return (kept + measured["rest"] * image_tokens * width * batch) / GB


def load(path, overrides=()):
    """The recipe at `path` checked as `finetune train` checks it, except for the modules its family needs at run time
    (FamilySpec.needs: Qwen-Image 2.1's torchvision, for its processor): an estimate loads no model."""
    from unittest import mock

    from finetune.recipe import checks
    from finetune.recipe.load import load_recipe

    with mock.patch.object(checks, "missing_modules", lambda spec: []):
        return load_recipe(path, list(overrides))


def rows(fsdp: tuple[int, ...] = (1, 2, 4, 8)) -> list[dict]:
    """One row per (shipped recipe, model[, FSDP GPUs]); a recipe not in recipes/ is left out."""
    out = []
    for name in RECIPES:
        path = ROOT / "recipes" / f"{name}.yaml"
        if not path.is_file():
            print(f"({path.name} is not in recipes/ yet: left out)", file=sys.stderr)
            continue
        recipe = load(path)
        key = _model_for(recipe.model.base)
        if key is None:
            print(f"({name}: no model for {recipe.model.base} in MODELS: left out)", file=sys.stderr)
            continue
        keys = [key] + (["sd35-large"] if key == "sd35-medium" else [])  # the SD3.5 recipe on Large too
        counts = fsdp if recipe.strategy.kind == "dreambooth" else (1,)
        for key in keys:
            for n in counts:
                result = estimate(recipe, MODELS[key], fsdp=n)
                out.append({"recipe": name, "model": MODELS[key].name, "hub": MODELS[key].hub, "gpus": n,
                            "resolution": recipe.data.resolution, "batch_size": recipe.train.batch_size,
                            "quantize": recipe.model.quantize, "optimizer": recipe.train.optimizer,
                            "gradient_checkpointing": recipe.train.gradient_checkpointing, **result})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fsdp", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="GPU counts for whole-model (DreamBooth) recipes under FSDP")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    table = rows(tuple(args.fsdp))
    print("Estimated peak GPU memory (estimates, not measured on a GPU; benchmarks/memory.py)\n")
    print(f"{'recipe':22} {'model':15} {'GPUs':>4} {'px':>5} {'GB':>6}  {'peak in':12} training (GB); other phases")
    for row in table:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in row["parts"].items())
        others = ", ".join(f"{k} {v:.1f}" for k, v in row["phases"].items() if k != "training")
        print(f"{row['recipe']:22} {row['model']:15} {row['gpus']:>4} {row['resolution']:>5} {row['gb']:6.1f}  "
              f"{row['phase']:12} {parts}; {others}")
    if args.json:
        from finetune.io.atomic import write_text_atomically

        print(f"wrote {write_text_atomically(args.json, json.dumps(table, indent=2))}")


if __name__ == "__main__":
    main()
