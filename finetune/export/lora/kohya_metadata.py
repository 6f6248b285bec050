"""The `ss_*` and `modelspec.*` header keys kohya-ss writes and the UIs read, from finetune's own metadata.

AUTOMATIC1111 and Forge read `ss_base_model_version`, `ss_v2` and `modelspec.*` to tell the family
(family_header.py) and `ss_output_name` for the name; their metadata panels, ComfyUI and civitai show the training
figures. Values are strings, as kohya writes them. No timestamps: the same run must give the same file (issue:
bit-identical artifacts).
"""
from __future__ import annotations

import json
from collections import Counter
from typing import Any

from finetune.export.family_header import family_fields, version_from_width
from finetune.export.lora.layers import LoraWeights



def cross_attention_width(weights: LoraWeights) -> int | None:
    for component, module, layer in weights.modules():
        if component == "unet" and module.endswith(("attn2.to_k", "attn2.to_v")):
            return int(layer.down.shape[1])
    text = weights.layers.get("text_encoder", {})
    for module, layer in text.items():
        if module.endswith(("q_proj", "k_proj", "v_proj")):
            return int(layer.down.shape[1])
    return None


def base_model_version(weights: LoraWeights, prediction_type: str | None) -> str:
    """kohya's ss_base_model_version for SD 1.x/2.x/XL layers, told from their widths (family_header.py)."""
    return version_from_width(cross_attention_width(weights), prediction_type)


def network_module(version: str) -> str:
    """kohya's ss_network_module: the family's own trainer module (its FamilySpec's kohya_network_module, e.g.
    sd-scripts' networks.lora_flux), else networks.lora (SD 1.x/2.x/XL)."""
    from finetune.models import specs

    found = [spec.kohya_network_module for spec in specs().values()
             if spec.kohya_base_model_version == version and spec.kohya_network_module]
    return found[0] if found else "networks.lora"


def _most_common(values: list[float]) -> float:
    return Counter(values).most_common(1)[0][0] if values else 0.0


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def kohya_metadata(weights: LoraWeights, output_name: str, version: str | None = None) -> dict[str, str]:
    """Header for the kohya file: finetune's own keys kept, `ss_*` and `modelspec.*` derived from them;
    `version`: the family's ss_base_model_version (None: told from the layers' widths)."""
    source = weights.metadata
    recipe: dict[str, Any] = json.loads(source.get("finetune.recipe") or "{}")
    train, data, strategy, model = (recipe.get(k, {}) for k in ("train", "data", "strategy", "model"))
    # the family's, else what the training header says (family_header.py), else the widths'
    version = version or source.get("ss_base_model_version") or base_model_version(weights,
                                                                                   model.get("prediction_type"))
    layers = [layer for _, _, layer in weights.modules()]
    is_conv = [layer.down.ndim == 4 and layer.down.shape[-1] > 1 for layer in layers]
    conv = [layer for layer, flag in zip(layers, is_conv) if flag]
    linear_like = [layer for layer, flag in zip(layers, is_conv) if not flag]
    network_args = {}
    if conv:  # LoCon: kohya's networks.lora takes conv rank/alpha as network args
        network_args = {"conv_dim": _number(_most_common([layer.rank for layer in conv])),
                        "conv_alpha": _number(_most_common([layer.alpha for layer in conv]))}
    learning_rate = train.get("learning_rate")
    unet_lr = strategy.get("learning_rate") or learning_rate
    resolution = data.get("resolution")
    # a foreign kohya file keeps its own figures; what the layers themselves say is derived afresh below
    meta = {k: v for k, v in source.items() if not k.startswith("sshs_")}
    meta.pop("lora_adapter_metadata", None)
    meta.pop("format", None)
    base_name = source.get("finetune.base_model") or model.get("base")
    figures = {
        "ss_output_name": output_name,
        "ss_network_module": network_module(version),
        "ss_network_dim": _number(_most_common([layer.rank for layer in linear_like or layers])),
        "ss_network_alpha": _number(_most_common([layer.alpha for layer in linear_like or layers])),
        "ss_network_args": json.dumps(network_args) if network_args else None,
        "ss_network_dropout": strategy.get("dropout"),
        "ss_sd_model_name": base_name,
        "ss_learning_rate": learning_rate,
        "ss_unet_lr": unet_lr,
        "ss_text_encoder_lr": (strategy.get("text_encoder_learning_rate") or unet_lr)
        if "text_encoder" in weights.layers else None,
        "ss_max_train_steps": train.get("max_steps"),
        "ss_steps": source.get("finetune.steps"),
        "ss_seed": train.get("seed"),
        "ss_batch_size_per_device": train.get("batch_size"),
        "ss_gradient_accumulation_steps": train.get("gradient_accumulation_steps"),
        "ss_resolution": f"({resolution}, {resolution})" if resolution else None,
        "ss_lr_scheduler": train.get("lr_scheduler"),
        "ss_lr_warmup_steps": train.get("lr_warmup_steps"),
        "ss_optimizer": train.get("optimizer"),
        "ss_mixed_precision": train.get("mixed_precision"),
        "ss_gradient_checkpointing": train.get("gradient_checkpointing"),
        "ss_max_grad_norm": train.get("max_grad_norm"),
        "ss_noise_offset": model.get("noise_offset"),
        "ss_min_snr_gamma": model.get("min_snr_gamma"),
        "ss_caption_dropout_rate": data.get("caption_dropout"),
        "ss_flip_aug": data.get("random_flip"),
        "ss_num_train_images": source.get("finetune.num_train_images"),
        "ss_tag_frequency": source.get("finetune.tag_frequency"),
        "ss_training_comment": f"trained with finetune {source.get('finetune.version', '')}".strip()
        if "finetune.version" in source else None,
        **family_fields(version, "lora", str(base_name or "")),
        "modelspec.title": output_name,
        "modelspec.resolution": f"{resolution}x{resolution}" if resolution else None,
    }
    meta.update({k: str(v) for k, v in figures.items() if v is not None})
    return meta
