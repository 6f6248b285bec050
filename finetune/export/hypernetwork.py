"""Hypernetwork files: ours (safetensors) and AUTOMATIC1111's (a pickled .pt).

- `hypernetwork.safetensors`: tensors `<width>.<k|v>.linear.<i>.<weight|bias>` (the MLPs' own state-dict keys,
  numbered as AUTOMATIC1111 numbers them) and the structure as JSON under the header key
  `finetune.hypernetwork` (layer_structure, activation, layer_norm, dropout_structure, activate_output,
  self_attention, widths, text_stream), so the file alone rebuilds the network. `text_stream` is null for a
  U-Net's cross-attention, else the transformer's stream it rewrites: {"layers": "transformer_blocks.",
  "keys": "add_k_proj", "values": "add_v_proj", "model": "SD3Transformer2DModel"}
  (finetune/networks/hypernetwork_points.py).
- AUTOMATIC1111 `.pt`: `{width: (state_dict_k, state_dict_v), "layer_structure": [...], "activation_func",
  "is_layer_norm", "weight_initialization", "use_dropout", "dropout_structure", "last_layer_dropout",
  "activate_output", "step", "name", "sd_checkpoint", "sd_checkpoint_name"}`: plain containers only, read
  with `torch.load(weights_only=True)`. A1111 applies a width's pair wherever an attention layer's key/value
  input has that width, so an imported file gets `self_attention: true`. A1111 knows U-Net cross-attention
  only: a text-stream network has no .pt.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import torch

from finetune.io.pickle_files import load_plain_pickle, write_pickle_atomically
from finetune.io.safetensors_io import read_metadata, save_safetensors
from finetune.networks.hypernetwork import ACTIVATIONS, WEIGHT_INITS, Hypernetwork, Structure, dropout_structure
from finetune.networks.hypernetwork_points import TextStream

FILE_NAME = "hypernetwork.safetensors"
HEADER_KEY = "finetune.hypernetwork"
_KEY = re.compile(r"^(\d+)\.(k|v)\.(linear\.\d+\.(?:weight|bias))$")
# keys of the first A1111 files, before the MLPs became a Sequential
_OLD_KEYS = {"linear1.weight": "linear.0.weight", "linear1.bias": "linear.0.bias",
             "linear2.weight": "linear.1.weight", "linear2.bias": "linear.1.bias"}


def structure_header(structure: Structure) -> str:
    return json.dumps(dataclasses.asdict(structure), sort_keys=True)


def structure_from_header(text: str) -> Structure:
    raw = json.loads(text)
    stream = raw.pop("text_stream", None)  # absent in files written before transformers had hypernetworks
    return Structure(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()},
                     text_stream=TextStream(**stream) if stream else None)


def is_hypernetwork_file(metadata: dict[str, str], keys: list[str]) -> bool:
    return HEADER_KEY in metadata or (bool(keys) and all(_KEY.match(k) for k in keys))


def save(output_dir: Path, network: Hypernetwork, metadata: dict[str, str], *, a1111_pt: bool = False,
         name: str = "hypernetwork", weight_init: str = "normal", step: int = 0) -> Path:
    """Write `hypernetwork.safetensors` (and, on request, `<name>.pt` for AUTOMATIC1111); return the first."""
    meta = {**metadata, HEADER_KEY: structure_header(network.structure)}
    path = save_safetensors(network.tensors(), Path(output_dir) / FILE_NAME, meta)
    if a1111_pt:
        save_a1111_pt(network, Path(output_dir) / "a1111" / f"{name}.pt", name=name, weight_init=weight_init,
                      step=step, base_model=metadata.get("finetune.base_model", ""))
    return path


def read(path: str | os.PathLike) -> Hypernetwork:
    from finetune.io.safetensors_io import load_tensors

    metadata = read_metadata(path)
    if HEADER_KEY not in metadata:
        raise ValueError(f"{path}: a hypernetwork file needs its structure in the header key {HEADER_KEY!r}; "
                         "this one has none (was it written by finetune?)")
    network = Hypernetwork(structure_from_header(metadata[HEADER_KEY]))
    _load(network, load_tensors(path), path)
    return network


def _load(network: Hypernetwork, tensors: dict[str, torch.Tensor], path: object) -> None:
    expected = network.tensors()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    wrong = [f"{k}: file {tuple(tensors[k].shape)}, structure {tuple(expected[k].shape)}"
             for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or extra or wrong:
        raise ValueError(f"{path}: tensors do not fit the structure in its header "
                         f"(missing {missing[:3]}, unexpected {extra[:3]}, wrong shapes {wrong[:3]})")
    network.load_tensors(tensors)


def to_a1111(network: Hypernetwork, *, name: str, weight_init: str, step: int, base_model: str) -> dict:
    s = network.structure
    if s.text_stream is not None:
        raise ValueError(f"AUTOMATIC1111's hypernetwork .pt applies to a U-Net's cross-attention only; this "
                         f"network rewrites {s.text_stream.describe()} (write hypernetwork.safetensors alone)")
    data: dict = {}
    for width in s.widths:
        k, v = network.pair(width)
        data[int(width)] = tuple({key: t.detach().cpu().float().clone() for key, t in mlp.state_dict().items()}
                                 for mlp in (k, v))
    data.update({
        "layer_structure": list(s.layer_structure), "activation_func": s.activation, "is_layer_norm": s.layer_norm,
        "weight_initialization": WEIGHT_INITS.get(weight_init, "Normal"),
        "use_dropout": any(p > 0 for p in s.dropout_structure),
        "dropout_structure": list(s.dropout_structure),
        "last_layer_dropout": len(s.dropout_structure) > 2 and s.dropout_structure[-2] > 0,
        "activate_output": s.activate_output, "step": int(step), "name": name,
        "sd_checkpoint": None, "sd_checkpoint_name": base_model,
    })
    return data


def save_a1111_pt(network: Hypernetwork, path: Path, *, name: str, weight_init: str, step: int,
                  base_model: str) -> Path:
    data = to_a1111(network, name=name, weight_init=weight_init, step=step, base_model=base_model)
    return write_pickle_atomically(data, Path(path))


def from_a1111(data: dict, path: object = "<a1111>") -> Hypernetwork:
    """Rebuild an AUTOMATIC1111 hypernetwork from its loaded (plain) dict, with A1111's defaults for old files."""
    if not isinstance(data, dict) or not any(isinstance(k, int) for k in data):
        raise ValueError(f"{path}: not an AUTOMATIC1111 hypernetwork (no per-width layers)")
    layer_structure = tuple(float(x) for x in (data.get("layer_structure") or (1, 2, 1)))
    activation = data.get("activation_func") or "linear"
    if activation not in ACTIVATIONS:
        raise ValueError(f"{path}: activation {activation!r} is not one finetune builds "
                         f"(known: {', '.join(ACTIVATIONS)})")
    drops = data.get("dropout_structure")
    if drops is None:
        # what A1111 derives for files older than dropout_structure
        use, last = bool(data.get("use_dropout", False)), bool(data.get("last_layer_dropout", False))
        drops = dropout_structure(layer_structure, 0.3 if use else 0.0)
        if use and not last and len(drops) > 2:
            drops = drops[:-2] + (0.0, 0.0)
    structure = Structure(
        layer_structure=layer_structure, activation=activation, layer_norm=bool(data.get("is_layer_norm", False)),
        dropout_structure=tuple(float(p) for p in drops),
        activate_output=bool(data.get("activate_output", True)),  # A1111's default when the key is missing
        self_attention=True, widths=tuple(sorted(k for k in data if isinstance(k, int))))
    tensors = {}
    for width in structure.widths:
        for letter, state in zip("kv", data[width]):
            for key, value in state.items():
                tensors[f"{width}.{letter}.{_OLD_KEYS.get(key, key)}"] = value
    network = Hypernetwork(structure)
    _load(network, tensors, path)
    return network


def read_a1111_pt(path: str | os.PathLike) -> Hypernetwork:
    return from_a1111(load_plain_pickle(path, "AUTOMATIC1111 hypernetwork"), path)
