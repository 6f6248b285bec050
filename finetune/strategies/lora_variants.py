"""The LoRA strategy's variants as peft configs: LoRA (and DoRA), LoHa, LoKr, OFT; and the recipe checks for them.

How the recipe's `rank` and `alpha` map onto each variant:
- lora (DoRA with use_dora): r = rank, lora_alpha = alpha; the update is scaled by alpha / rank.
- loha, lokr (LyCORIS's Hadamard and Kronecker products): r = rank, alpha = alpha, the same alpha / rank scale.
  LoHa's update has rank up to rank², since it is the elementwise product of two rank-`rank` products.
- oft: `rank` is the block size (oft_block_size; peft infers the number of blocks from each layer's width), as
  LyCORIS's `dim` is for OFT. OFT rotates a layer's input by a learned orthogonal matrix: there is no update to
  scale, hence no alpha. peft rounds a block size that does not divide a layer's width to the nearest one that does.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

VARIANTS = ("lora", "loha", "lokr", "oft")
# the part of a parameter's name that peft gives each variant's adapter weights (e.g. `to_q.hada_w1_a.default`)
ADAPTER_PARAMETER_MARKERS = ("lora_", "hada_", "lokr_", "oft_")


def is_adapter_parameter(name: str) -> bool:
    return any(marker in name for marker in ADAPTER_PARAMETER_MARKERS)


def peft_config(variant: str, *, rank: int, alpha: float | None, dropout: float = 0.0, use_dora: bool = False,
                targets: Sequence[str], conv_targets: Sequence[str] = (), conv_rank: int | None = None,
                conv_alpha: float | None = None) -> Any:
    """The peft config for one component. `conv_targets` get their own rank and alpha through peft's
    rank_pattern / alpha_pattern (patterns match a module name's tail, as target_modules do)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig, OFTConfig

    alpha = alpha or rank  # None: scale 1
    conv_rank = conv_rank or rank
    # None: the conv layers keep the other layers' scale (alpha / rank), whatever their own rank
    conv_alpha = conv_alpha or alpha * conv_rank / rank
    target_modules = list(targets) + list(conv_targets)
    rank_pattern = {name: conv_rank for name in conv_targets}
    alpha_pattern = {name: conv_alpha for name in conv_targets}
    if variant == "lora":
        # gaussian: lora_A random, lora_B zero, so the adapter starts as the identity
        return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, use_dora=use_dora,
                          init_lora_weights="gaussian", target_modules=target_modules,
                          rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    if variant in ("loha", "lokr"):
        config_class = LoHaConfig if variant == "loha" else LoKrConfig
        return config_class(r=rank, alpha=alpha, target_modules=target_modules,
                            rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    if variant == "oft":
        if conv_targets:
            raise ValueError("OFT on convolutions is refused by the recipe check (see `problems`)")
        return OFTConfig(r=0, oft_block_size=rank, target_modules=target_modules)
    raise ValueError(f"unknown LoRA variant {variant!r} (one of {', '.join(VARIANTS)})")


def refuse_oft_on_convolutions(targets: Sequence[str], unet: Any) -> None:
    """strategy.target_modules can name convolutions too; peft's OFT gets those with kernels over 1x1 wrong (its
    unfold/fold sums overlapping patches, so even the untrained adapter changes the output)."""
    import torch
    from peft import OFTConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    from finetune.strategies.base import StrategySetupError

    config = OFTConfig(r=0, oft_block_size=2, target_modules=list(targets))
    convs = [name for name, module in unet.named_modules() if isinstance(module, torch.nn.Conv2d)
             and max(module.kernel_size) > 1 and check_target_module_exists(config, name)]
    if convs:
        raise StrategySetupError(f"strategy.target_modules: with variant oft they pick {len(convs)} convolutions "
                                 f"with kernels over 1x1 (e.g. {convs[0]}), which peft's OFT does not adapt "
                                 "correctly; remove them from strategy.target_modules, or set "
                                 "strategy.variant: lora, loha or lokr")


def problems(options: Any) -> list[str]:
    """What the recipe's variant options get wrong, each with its fix (their bounds are declared on the keys, in
    finetune/strategies/lora.py)."""
    o = options
    found = []
    if o.use_dora and o.variant != "lora":
        found.append(f"strategy.use_dora: DoRA is a form of plain LoRA, not of {o.variant}; set strategy.variant: "
                     "lora, or remove use_dora")
    if o.variant != "lora" and o.dropout:
        found.append(f"strategy.dropout: applies to variant lora only (peft's {o.variant} has no input dropout); "
                     "remove it")
    if o.variant == "oft":
        for key in ("alpha", "conv_alpha"):
            if getattr(o, key) is not None:
                found.append(f"strategy.{key}: OFT has no alpha (it rotates a layer's input, so there is no update "
                             "to scale); remove it, and set the block size with strategy.rank")
        for key in ("rank", "text_encoder_rank"):
            value = getattr(o, key)
            if value is not None and value == 1:
                found.append(f"strategy.{key}: with variant oft it is the block size, and a 1x1 rotation learns "
                             "nothing; use at least 2 (e.g. 4, 8 or 32)")
        if o.conv_layers:
            found.append("strategy.conv_layers: peft's OFT does not adapt 3x3 convolutions correctly (its "
                         "unfold/fold changes the output even before training); set strategy.variant: lora, loha "
                         "or lokr for convolutions, or strategy.conv_layers: false")
    if not o.conv_layers and (o.conv_rank is not None or o.conv_alpha is not None):
        found.append("strategy.conv_rank / conv_alpha: set, but strategy.conv_layers is false; set "
                     "strategy.conv_layers: true or remove them")
    return found
