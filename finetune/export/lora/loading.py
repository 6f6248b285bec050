"""LoRA-family files into a diffusers pipeline, through peft (networks/peft_layers.py): the loaders the format
registry gives finetune.load_adapter for them."""
from __future__ import annotations

from typing import Any

from finetune.export.lora import kohya, lycoris, peft_adapter
from finetune.export.lora.files import read_lora
from finetune.export.lora.layers import peft_config, peft_state_dict
from finetune.io.safetensors_io import read_safetensors


def load_lora(pipe: Any, path: str, scale: float, name: str) -> str:
    """A LoRA file in diffusers' or kohya's format, read as layers so that every layer keeps its own rank and alpha
    (kohya files may differ per layer; a layer without alpha takes its rank, kohya's convention), and put in
    through peft. diffusers' load_lora_weights applies one alpha per file to kohya files."""
    from peft import LoraConfig

    modules = kohya.module_paths(pipe)
    weights = read_lora(path, modules)
    layers = {c: _as_named_here(per, set(modules.get(c, ()))) for c, per in weights.layers.items()}
    configs = {c: LoraConfig(**peft_config(per, weights.uses_dora)) for c, per in layers.items()}
    states = {c: peft_state_dict(per) for c, per in layers.items()}
    return peft_adapter.load_components(pipe, configs, states, name, scale, path)


def _as_named_here(layers: dict, names: set[str]) -> dict:
    # files from transformers before 5.6 name text-encoder modules `text_model.encoder...`; 5.6 dropped that level
    return {m.removeprefix("text_model.") if m not in names and m.removeprefix("text_model.") in names else m: layer
            for m, layer in layers.items()}


def load_lycoris(pipe: Any, path: str, scale: float, name: str) -> str:
    """LoHa / LoKr in the LyCORIS layout (kohya names): rebuilt in peft with the strength AUTOMATIC1111 and
    ComfyUI give each module."""
    tensors, _ = read_safetensors(path)
    _, states, configs = lycoris.from_lycoris(tensors, path, kohya.module_paths(pipe))
    return peft_adapter.load_components(pipe, configs, states, name, scale, path)
