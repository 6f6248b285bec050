"""Activation memory of a transformer block per token, measured on this CPU on a narrow copy of the real block.

What backward keeps: every tensor autograd saves while the denoiser runs forward (counted once per storage through
`torch.autograd.graph.saved_tensors_hooks`; the weights themselves left out), attributed to the block that was
running. The model (benchmarks/small_models.py) is the family's diffusers class with the real head size (128 for
Flux, Flux.2, Qwen-Image 1 and 2.1 and Chroma, 64 for SD3, 96 for Lumina 2, 32 / 112 for Sana's linear / cross
attention, Krea 2's 128 at 12 / 3 heads) but 2 heads (Lumina 2 3 / 1, Sana 7 / 2, Krea 2 12 / 3: their grouped-query
ratios), a rank-1 LoRA on the family's default targets, bf16 weights under bf16 autocast as the loop trains, and
attention through SDPA's flash kernel (the one a GPU takes; it keeps q, k, v, the output and a log-sum-exp, nothing
quadratic in tokens). Every tensor a block saves is [tokens, k x width] (the attention's log-sum-exp, [heads,
tokens], is rounding), so bytes / (tokens x width) is a constant of the block's design: `bytes_per_token_width`. A
full-size block then keeps that x tokens x width x batch bytes; with gradient checkpointing it keeps only its inputs
(the hidden states, `KEPT_PER_TOKEN_WIDTH` bytes per token and width in bf16), and the one block being recomputed
holds its full share again during backward.
Sana's ratios are per image token (`IMAGE_TOKENS_ONLY`: the caption is cross attention's keys and values only);
Lumina 2's refiners and Krea 2's text fusion, which diffusers does not checkpoint, are in "rest" (per image token:
Krea 2's and Qwen-Image 2.1's (its output layers run over the text too) measured at 1024 px's text share,
`MEASURE_TOKENS`, so more per image token at smaller sides); HiDream's MoE feed-forward runs its training path
(every token through its 2 routed experts and the shared one).
Masks: none here (Lumina 2's context refiner gets an all-true caption mask). Qwen-Image's and 2.1's predict pass
none when no caption in the batch is padded (batch 1). 2.1's block-causal attention runs as its default
QwenImage21AttnProcessor runs it: one SDPA call for the caption (with a causal [text, text] bool mask, which a GPU's
flash kernel refuses: memory-efficient SDPA keeps the same tensors and that mask, 0.5 MB at 512 tokens) and one,
unmasked, for the image. Chroma's training gives every block a [batch, 1, tokens, tokens] mask (real caption tokens
plus one pad): attention then runs without the flash kernel and may keep that mask for backward, about 42 MB a block
in bf16 at 1024 px, not in the ratios (with gradient checkpointing, one block's).
"""
from __future__ import annotations

import torch

from benchmarks.small_models import FAMILIES, TEXT_STREAMS  # noqa: F401 (the small models, FAMILIES read from here)

KEPT_PER_TOKEN_WIDTH = 2  # a checkpointed block keeps its input hidden states: one bf16 value per token and width


def block_kinds(model) -> list[tuple[str, torch.nn.Module]]:
    """(kind, block) for every checkpointed block of a transformer in the order they run: Flux's, Flux.2's and
    Chroma's "double" and "single"; SD3 "dual" (SD3.5 Medium's first 13), "joint", and "last" (its context stream
    ends there); Qwen-Image's 60 alike dual-stream blocks, Sana's 20, Krea 2's 28 and Qwen-Image 2.1's 32
    single-stream ones and Lumina 2's 26 joint layers "joint" (its 2 + 2 refiner blocks, which diffusers does not
    checkpoint, count as "rest"); HiDream's "double" and "single" stream blocks."""
    if hasattr(model, "double_stream_blocks"):  # HiDream
        return ([("double", b) for b in model.double_stream_blocks]
                + [("single", b) for b in model.single_stream_blocks])
    if hasattr(model, "noise_refiner"):  # Lumina 2
        return [("joint", b) for b in model.layers]
    if hasattr(model, "single_transformer_blocks"):
        return ([("double", b) for b in model.transformer_blocks]
                + [("single", b) for b in model.single_transformer_blocks])
    if "dual_attention_layers" not in model.config:  # Qwen-Image: one kind of block, both streams to the end
        return [("joint", b) for b in model.transformer_blocks]
    dual = set(model.config.dual_attention_layers or ())
    blocks = model.transformer_blocks
    return [("last" if i == len(blocks) - 1 else "dual" if i in dual else "joint", b) for i, b in enumerate(blocks)]


# Sana's blocks hold the image tokens alone (the caption enters as cross attention's keys and values): its ratios
# are per image token
IMAGE_TOKENS_ONLY = {"sana"}
# (image, text) tokens of the measurement where "rest" holds work on the text, counted per image token: Krea 2's
# text fusion (LoRA reaches its attention: the same names), Qwen-Image 2.1's norm_out and proj_out over the whole
# sequence; measured at 1024 px's share (4096 image, 512 text)
MEASURE_TOKENS = {"krea2": (64, 8), "qwen_image_2_1": (64, 8)}


def block_tokens(family: str, image_tokens: int, text_tokens: int) -> int:
    """The tokens a block of `family` holds: both streams', or the image's alone (`IMAGE_TOKENS_ONLY`)."""
    return image_tokens if family in IMAGE_TOKENS_ONLY else image_tokens + text_tokens


def measure(family: str, image_tokens: int | None = None, text_tokens: int | None = None) -> dict[str, float]:
    """{block kind (`block_kinds`): saved bytes per token per unit of width}, tokens of both streams, for a
    transformer of one of `FAMILIES`, plus "rest": what the embedders and output layers save, in bytes per image token
    per unit of width."""
    from peft import LoraConfig

    from finetune.networks import peft_layers

    default = MEASURE_TOKENS.get(family, (64, 32))
    image_tokens, text_tokens = image_tokens or default[0], text_tokens or default[1]
    torch.manual_seed(0)
    small, inputs, targets = FAMILIES[family]
    model = small()
    model.requires_grad_(False)
    peft_layers.inject(model, LoraConfig(r=1, lora_alpha=1, target_modules=list(targets)))
    model.to(torch.bfloat16)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    from benchmarks.meta_models import width as _width

    width = _width(model)
    weights = {p.data_ptr() for p in model.parameters()}
    current, saved, seen = ["rest"], {}, set()

    def pack(tensor):
        key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if key[0] not in weights and key not in seen:
            seen.add(key)
            saved[current[0]] = saved.get(current[0], 0) + key[1]
        return tensor

    blocks = block_kinds(model)
    for kind, block in blocks:
        block.register_forward_pre_hook(lambda *_, k=kind: current.__setitem__(0, k))
        block.register_forward_hook(lambda *_: current.__setitem__(0, "rest"))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    args = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() and k != "guidance" else v
            for k, v in inputs(model, image_tokens, text_tokens).items()}
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cpu", dtype=torch.bfloat16), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**args, return_dict=False)[0].float().pow(2).mean()
    text_tokens -= text_tokens % TEXT_STREAMS.get(family, 1)  # the tokens the inputs gave it
    tokens = block_tokens(family, image_tokens, text_tokens)
    result = {kind: saved[kind] / (tokens * width) / sum(k == kind for k, _ in blocks) for kind, _ in blocks}
    result["rest"] = saved.get("rest", 0) / (image_tokens * width)
    return result
