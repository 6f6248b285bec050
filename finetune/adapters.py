"""Apply a trained artifact to a diffusers pipeline. Each strategy's file format registers a loader here."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from safetensors import safe_open

from finetune.export import hypernetwork as hypernetwork_files
from finetune.export import lora_layers, lycoris, peft_adapter
from finetune.export.kohya_lora import module_paths
from finetune.export.mismatch import another_base_error
from finetune.export.pickle_files import load_plain_pickle
from finetune.export.safetensors_io import read_metadata
from finetune.export.textual_inversion import A1111_KEY, embedding_from_a1111
from finetune.models.base import adaptable_modules, denoiser_of
from finetune.networks import hypernetwork as hypernetworks
from finetune.networks import peft_layers

# format name -> (detector on (metadata, keys), loader(pipe, path, scale, name) -> adapter name)
Detector = Callable[[dict[str, str], list[str]], bool]
Loader = Callable[[Any, str, float, str], str]
LOADERS: dict[str, tuple[Detector, Loader]] = {}


def register(name: str, detect: Detector, load: Loader) -> None:
    LOADERS[name] = (detect, load)


def detect_format(path: str | os.PathLike) -> str:
    """The registered format of a .safetensors adapter file."""
    path = str(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"{path}: expected a .safetensors adapter file (or an AUTOMATIC1111 .pt embedding or "
                         "hypernetwork)")
    metadata = read_metadata(path)
    with safe_open(path, framework="pt") as handle:
        keys = list(handle.keys())
    for name, (detect, _) in LOADERS.items():
        if detect(metadata, keys):
            return name
    raise ValueError(f"{path}: not an adapter format finetune knows (formats: {', '.join(LOADERS)})")


def trained_max_token_length(path: str | os.PathLike) -> int | None:
    """The data.max_token_length an artifact was trained with, from the recipe in its header (None: the plain
    window, or a file that does not say)."""
    import json

    folder = Path(path)
    try:
        if (folder / "model_index.json").is_file():  # a DreamBooth pipeline folder
            metadata = json.loads((folder / "finetune.json").read_text())
        elif str(path).endswith(".safetensors"):
            metadata = read_metadata(path)
        else:
            return None
        return json.loads(metadata["finetune.recipe"])["data"].get("max_token_length")
    except (OSError, KeyError, TypeError, ValueError):
        return None


def _load_a1111_pt(pipe: Any, path: str, scale: float, name: str) -> str:
    """AUTOMATIC1111's pickled embedding or hypernetwork, told apart by what the file holds; read once, and
    only if it is plain data (never code)."""
    data = load_plain_pickle(path, "AUTOMATIC1111 .pt file")
    if isinstance(data, dict) and "string_to_param" in data:
        token, vectors = embedding_from_a1111(data, path)
        return _load_embeddings(pipe, [token], [vectors])
    if isinstance(data, dict) and any(isinstance(key, int) for key in data):
        return _attach_hypernetwork(pipe, hypernetwork_files.from_a1111(data, path), scale, name)
    raise ValueError(f"{path}: a .pt file that is neither an AUTOMATIC1111 embedding (string_to_param) nor "
                     "hypernetwork (per-width layers)")


def load_adapter(pipe: Any, path: str | os.PathLike, scale: float = 1.0, name: str | None = None) -> str:
    """Load an adapter file into `pipe` at strength `scale`; returns the adapter's name in the pipeline.
    LoRA, LoHa, LoKr: `scale` weights the update (0: the base). DoRA: it weights the direction update only, the
    learned magnitudes stay. OFT: scale 1 only (a rotation has no strength)."""
    name = name or Path(path).stem.replace(".", "_")
    try:
        if str(path).endswith(".pt"):
            return _load_a1111_pt(pipe, str(path), scale, name)
        return LOADERS[detect_format(path)][1](pipe, str(path), scale, name)
    except RuntimeError as exc:  # the loaders' load_state_dict: torch's "size mismatch for ..."
        raise another_base_error(exc, str(path)) or exc from None


def _is_lora(metadata: dict[str, str], keys: list[str]) -> bool:
    if metadata.get(peft_adapter.VARIANT_KEY, "lora") != "lora" or lycoris.is_lycoris(keys):
        return False  # LoHa/LoKr/OFT, in peft's layout or LyCORIS's: loaded below
    return metadata.get("finetune.strategy") == "lora" or any(
        ".lora_A." in k or ".lora.down." in k or ".lora_down." in k for k in keys)


def _load_lora(pipe: Any, path: str, scale: float, name: str) -> str:
    """A LoRA file in diffusers' or kohya's format, read as layers (lora_layers.read_lora) so that every layer
    keeps its own rank and alpha (kohya files may differ per layer; a layer without alpha takes its rank, kohya's
    convention), and put in through peft. diffusers' load_lora_weights applies one alpha per file to kohya files."""
    from peft import LoraConfig

    modules = module_paths(pipe)
    weights = lora_layers.read_lora(path, modules)
    layers = {c: _as_named_here(per, set(modules.get(c, ()))) for c, per in weights.layers.items()}
    configs = {c: LoraConfig(**lora_layers.peft_config(per, weights.uses_dora)) for c, per in layers.items()}
    states = {c: lora_layers.peft_state_dict(per) for c, per in layers.items()}
    return peft_adapter.load_components(pipe, configs, states, name, scale, path)


def _as_named_here(layers: dict, names: set[str]) -> dict:
    # files from transformers before 5.6 name text-encoder modules `text_model.encoder...`; 5.6 dropped that level
    return {m.removeprefix("text_model.") if m not in names and m.removeprefix("text_model.") in names else m: layer
            for m, layer in layers.items()}


register("lora", _is_lora, _load_lora)


def _load_lycoris(pipe: Any, path: str, scale: float, name: str) -> str:
    """LoHa / LoKr in the LyCORIS layout (kohya names): rebuilt in peft with the strength AUTOMATIC1111 and
    ComfyUI give each module."""
    from safetensors.torch import load_file

    _, states, configs = lycoris.from_lycoris(load_file(path), path, module_paths(pipe))
    return peft_adapter.load_components(pipe, configs, states, name, scale, path)


register("lycoris", lambda metadata, keys: lycoris.is_lycoris(keys), _load_lycoris)
# LoHa, LoKr, OFT: peft layers rebuilt from the configs in the file's header
register("peft_adapter", peft_adapter.is_peft_adapter, peft_adapter.load_peft_adapter)


def _is_diffusers_embedding(metadata: dict[str, str], keys: list[str]) -> bool:
    # {token: tensor}: keys are the tokens themselves, e.g. "<cat-toy>"
    if not keys or keys == [A1111_KEY]:
        return False
    return metadata.get("finetune.strategy") == "textual_inversion" or not any("." in k for k in keys)


def _load_embeddings(pipe: Any, tokens: list[str], tensors: list) -> str:
    # diffusers' own loader: it adds the tokens (multi-vector ones expanded) and refuses known words
    pipe.load_textual_inversion(tensors, token=tokens)
    return ",".join(tokens)


def _load_diffusers_embedding(pipe: Any, path: str, scale: float, name: str) -> str:
    from safetensors.torch import load_file

    tensors = load_file(path)
    return _load_embeddings(pipe, list(tensors), list(tensors.values()))


def _load_a1111_embedding(pipe: Any, path: str, scale: float, name: str) -> str:
    from safetensors.torch import load_file

    # AUTOMATIC1111 names an embedding after its file
    return _load_embeddings(pipe, [Path(path).stem], [load_file(path)[A1111_KEY]])


register("textual_inversion", _is_diffusers_embedding, _load_diffusers_embedding)
register("a1111_embedding", lambda metadata, keys: keys == [A1111_KEY], _load_a1111_embedding)


def _attach_hypernetwork(pipe: Any, network: Any, scale: float, name: str) -> str:
    network.set_strength(scale)
    network.eval()
    hypernetworks.attach(denoiser_of(pipe), network, name)
    return name


register("hypernetwork", hypernetwork_files.is_hypernetwork_file,
         lambda pipe, path, scale, name: _attach_hypernetwork(pipe, hypernetwork_files.read(path), scale, name))


def unload_adapter(pipe: Any, name: str | None = None) -> list[str]:
    """Remove a loaded hypernetwork or LoRA (LoHa, LoKr, OFT too) by the name `load_adapter` returned (None:
    every hypernetwork); the pipeline then predicts as before. Returns what was removed.
    (Embeddings: diffusers' `pipe.unload_textual_inversion()`.)"""
    denoiser = denoiser_of(pipe)
    if name is None or name in hypernetworks.loaded(denoiser):
        return hypernetworks.detach(denoiser, name)
    modules = adaptable_modules(pipe).values()
    holders = [m for m in modules if name in peft_layers.adapter_names(m)]
    if not holders:
        loras = sorted({n for m in modules for n in peft_layers.adapter_names(m)})
        raise ValueError(f"no adapter named {name!r} is loaded (hypernetworks: "
                         f"{list(hypernetworks.loaded(denoiser))}, LoRAs: {loras})")
    for module in holders:
        peft_layers.remove(module, name)
    return [name]
