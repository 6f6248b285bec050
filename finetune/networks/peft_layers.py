"""The one place adapter layers (LoRA, DoRA, LoHa, LoKr, OFT) enter and leave a model: peft's public functional API
(`peft.functional`), on any torch module (U-Net, text encoder, transformer denoiser).

Never through the `add_adapter` / `load_adapter` / `enable_adapters` wrappers of transformers or diffusers: each
of those first checks a minimum peft version of its own (transformers 5.24 refuses every peft release before
0.22), so a release of either could stop training although peft itself is fine.

What the wrappers add besides the gate is kept, so diffusers' pipeline helpers (`get_list_adapters`,
`set_adapters`, `delete_adapters`) see an adapter injected here like one its own loader put in: peft records the
configs in `module.peft_config`, and `_hf_peft_config_loaded` marks the module as holding adapters.
"""
from __future__ import annotations

from typing import Any

import torch

DEFAULT_NAME = "default"  # peft's own name for an adapter nobody named


def adapter_names(module: torch.nn.Module) -> list[str]:
    """The names of the adapters injected into `module` (empty: none)."""
    return list(getattr(module, "peft_config", None) or {})


def inject(module: torch.nn.Module, config: Any, name: str = DEFAULT_NAME) -> None:
    """Add adapter layers built from the peft `config` (LoraConfig, LoHaConfig, ...) to `module` in place, under
    `name`, and make them the active adapter alone (trainable, base weights untouched).
    Raises ValueError if `module` already holds an adapter called `name`."""
    from peft.functional import inject_adapter_in_model, set_adapter

    if name in adapter_names(module):
        raise ValueError(f"an adapter named {name!r} is already in this {type(module).__name__}; pass another name "
                         "or remove it first")
    inject_adapter_in_model(config, module, adapter_name=name)
    module._hf_peft_config_loaded = True  # diffusers' pipeline helpers list only modules marked so
    set_adapter(module, name)


def state_dict(module: torch.nn.Module, name: str = DEFAULT_NAME) -> dict[str, torch.Tensor]:
    """The adapter's weights under peft's keys without the adapter's name (`<module>.lora_A.weight`), as diffusers'
    LoRA file stores them per component."""
    from peft.functional import get_peft_model_state_dict

    return get_peft_model_state_dict(module, adapter_name=name)


def load_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor], name: str = DEFAULT_NAME) -> Any:
    """Load `state` (keys as `state_dict` gives them) into the adapter `name`; returns torch's
    (missing_keys, unexpected_keys), where missing lists the base's weights too. A shape that does not fit raises
    torch's RuntimeError ("size mismatch for ...")."""
    from peft.functional import set_peft_model_state_dict

    return set_peft_model_state_dict(module, state, adapter_name=name)


def _layers(module: torch.nn.Module) -> list[Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [layer for layer in module.modules() if isinstance(layer, BaseTunerLayer)]


def enable(module: torch.nn.Module, enabled: bool) -> None:
    """Switch every adapter layer in `module` on or off; off, the module computes exactly what the base does.
    (peft also sets the active adapters' requires_grad to `enabled`.)"""
    for layer in _layers(module):
        layer.enable_adapters(enabled)


def set_scale(module: torch.nn.Module, name: str, scale: float) -> None:
    """Weight adapter `name`'s update by `scale` (LoRA, LoHa, LoKr: scaling = scale x alpha / r). OFT layers have
    no scaling and are left as they are."""
    for layer in _layers(module):
        if name in getattr(layer, "scaling", {}):
            layer.set_scale(name, scale)


def remove(module: torch.nn.Module, name: str) -> None:
    """Delete adapter `name`'s layers and config from `module`; the other adapters stay."""
    from peft.functional import delete_adapter
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

    configs = getattr(module, "peft_config", None) or {}
    if name not in configs:
        raise ValueError(f"no adapter named {name!r} in this {type(module).__name__} (it holds {list(configs)})")
    # the prefix of the variant's own sublayers (`lora_`, `hada_`, ...), which peft skips while deleting
    delete_adapter(module, name, prefix=PEFT_TYPE_TO_PREFIX_MAPPING[configs[name].peft_type])
    configs.pop(name)
    if not configs:
        _forget_adapters(module)


def fuse(module: torch.nn.Module) -> int:
    """Merge every active adapter layer into its base weight (peft's `merge`) and put the plain layer back, so the
    module needs no peft at all; returns how many layers were fused."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from finetune.models.quantize import refuse_quantized

    fused = 0
    for name, layer in list(module.named_modules()):
        if isinstance(layer, BaseTunerLayer):
            refuse_quantized(layer.get_base_layer(), "merging an adapter")
            layer.merge(adapter_names=list(layer.active_adapters))
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, child, layer.get_base_layer())
            fused += 1
    _forget_adapters(module)  # so a later injection starts clean
    return fused


def _forget_adapters(module: torch.nn.Module) -> None:
    if hasattr(module, "peft_config"):
        del module.peft_config
    if getattr(module, "_hf_peft_config_loaded", False):
        module._hf_peft_config_loaded = False


def let_dynamo_trace_dora() -> None:
    """Make peft's DoRA layers traceable by torch.compile (train.compile), idempotently. DoRA's forward asks
    `dequantize_module_weight(base_layer)` for the weight, which tells a torchao weight by
    `type(weight).__module__.startswith("torchao.")`; dynamo cannot read a class's `__module__` and breaks the graph
    there, in every DoRA layer. A plain Parameter needs no dequantising: this answers it directly and hands any
    other weight to peft's own function, so what DoRA computes does not change."""
    import peft.tuners.lora.dora as dora

    original = dora.dequantize_module_weight
    if getattr(original, "_finetune_traceable", False):
        return

    def weight_of(module: torch.nn.Module) -> torch.Tensor:
        weight = module.weight
        if type(weight) is torch.nn.Parameter:
            return weight
        return original(module)

    weight_of._finetune_traceable = True
    dora.dequantize_module_weight = weight_of


def let_dynamo_trace_lycoris(model: torch.nn.Module) -> int:
    """Keep peft's LoHa and LoKr layers of `model` whose module and rank dropouts are 0 in eval mode, so that
    torch.compile traces them whole; returns how many. In training mode each such layer draws
    `torch.rand(1) > module_dropout` to decide whether to add its update (peft/tuners/loha/layer.py, lokr too), a
    branch on a tensor, which dynamo cannot trace (a graph break in every adapter layer). With both dropouts 0 the
    two modes compute the same, so the layers answer train() by staying in eval mode. (The coin also consumed the
    global random stream: compiled runs of these variants draw their dropout elsewhere from other numbers.)"""
    from peft.tuners.lycoris_utils import LycorisLayer

    pinned = 0
    for layer in model.modules():
        if (isinstance(layer, LycorisLayer) and not any(layer.module_dropout.values())
                and not any(layer.rank_dropout.values())):
            layer.train = _stay_in_eval.__get__(layer)
            layer.train(False)
            pinned += 1
    return pinned


def _stay_in_eval(self: torch.nn.Module, mode: bool = True) -> torch.nn.Module:
    return torch.nn.Module.train(self, False)
