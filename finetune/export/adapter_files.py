"""Embeddings and hypernetworks as the format registry (formats.py) sees them: how to tell their files, what
`finetune inspect` says of them, reading, writing and loading them into a diffusers pipeline. The file layouts
themselves are textual_inversion.py's and hypernetwork.py's.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from finetune.export import hypernetwork as hypernetwork_files
from finetune.export.textual_inversion import A1111_KEY, embedding_from_a1111
from finetune.io.pickle_files import load_plain_pickle
from finetune.io.safetensors_io import Header, read_safetensors, save_safetensors
from finetune.models.base import denoiser_of, tokenizer_name
from finetune.networks import hypernetwork as hypernetworks


@dataclass
class Embeddings:
    """Textual-inversion vectors by prompt token, and the header that travels with them."""

    tokens: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)


def is_diffusers_embedding(metadata: dict[str, str], keys: list[str]) -> bool:
    # {token: tensor}: keys are the tokens themselves, e.g. "<cat-toy>"
    if not keys or keys == [A1111_KEY]:
        return False
    return metadata.get("finetune.strategy") == "textual_inversion" or not any("." in k for k in keys)


def is_a1111_embedding(metadata: dict[str, str], keys: list[str]) -> bool:
    return keys == [A1111_KEY]


def read_diffusers_embedding(path: str | os.PathLike, module_names: Any = None) -> Embeddings:
    return Embeddings(*read_safetensors(path))


def read_a1111_embedding(path: str | os.PathLike, module_names: Any = None) -> Embeddings:
    tensors, metadata = read_safetensors(path)
    # AUTOMATIC1111 names an embedding after its file
    return Embeddings({Path(path).stem: tensors[A1111_KEY]}, metadata)


def write_diffusers_embedding(embeddings: Embeddings, path: str | os.PathLike) -> Path:
    return save_safetensors(embeddings.tokens, path, embeddings.metadata)


def write_a1111_embedding(embeddings: Embeddings, path: str | os.PathLike) -> Path:
    """The one-token file AUTOMATIC1111 and kohya read (the prompt word is the file's name)."""
    if len(embeddings.tokens) != 1:
        raise ValueError(f"{path}: an AUTOMATIC1111 embedding holds one token, not {', '.join(embeddings.tokens)}")
    (vectors,) = embeddings.tokens.values()
    return save_safetensors({A1111_KEY: vectors}, path, embeddings.metadata)


def describe_diffusers_embedding(header: Header) -> dict[str, Any]:
    return {"kind": "textual-inversion embedding (diffusers format)"}


# the per-encoder embedding file's keys, by the pipeline part each belongs to (CLIP-L, CLIP-G): the format's own
PER_ENCODER_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}


def is_per_encoder_embedding(metadata: dict[str, str], keys: list[str]) -> bool:
    """SDXL's one-file layout (kohya's sdxl_train_textual_inversion.py, AUTOMATIC1111, ComfyUI), which SD3's two
    CLIPs use too: one tensor per text encoder, keyed by the family's embedding keys (clip_l, clip_g)."""
    return bool(keys) and set(keys) == set(PER_ENCODER_KEYS.values())


def describe_per_encoder_embedding(header: Header) -> dict[str, Any]:
    return {"kind": "textual-inversion embedding (SDXL/SD3: clip_l and clip_g; the file name is the prompt word)"}


def load_per_encoder_embedding(pipe: Any, path: str, scale: float, name: str) -> str:
    """Each encoder's vectors into its own text encoder and tokenizer, under one token: the placeholder the
    header names (a file finetune wrote), else the file's name (AUTOMATIC1111's convention)."""
    tensors, metadata = read_safetensors(path)
    placeholders = [t for t in metadata.get("finetune.placeholder_token", "").split(",") if t]
    token = placeholders[0] if len(placeholders) == 1 else Path(path).stem
    for encoder_name, key in PER_ENCODER_KEYS.items():
        encoder, tokenizer = getattr(pipe, encoder_name), getattr(pipe, tokenizer_name(encoder_name))
        if hasattr(pipe, "load_textual_inversion"):
            pipe.load_textual_inversion(tensors[key], token=token, text_encoder=encoder, tokenizer=tokenizer)
        else:  # StableDiffusion3Pipeline has no embedding loader
            add_embedding(tokenizer, encoder, token, tensors[key])
    return token


def add_embedding(tokenizer: Any, text_encoder: Any, token: str, vectors: torch.Tensor) -> list[str]:
    """Add `token` with `vectors` [num_vectors, dim] to a tokenizer and its text encoder, as diffusers'
    `load_textual_inversion` does for pipelines that have it: one vector per token, named `<tok>`, `<tok>_1`, ...
    Raises ValueError when the token is already a word of the vocabulary or the width is not the encoder's."""
    vectors = vectors.reshape(-1, vectors.shape[-1])
    embedding = text_encoder.get_input_embeddings()
    if vectors.shape[-1] != embedding.weight.shape[1]:
        raise ValueError(f"the embedding for {token!r} is {vectors.shape[-1]} wide and this text encoder's words "
                         f"are {embedding.weight.shape[1]}: it was trained for another base")
    tokens = [token] + [f"{token}_{i}" for i in range(1, len(vectors))]
    taken = [t for t in tokens if t in tokenizer.get_vocab()]
    if taken:
        raise ValueError(f"{', '.join(taken)} is already in the tokenizer's vocabulary (loaded before, or a word "
                         "of the base); load it into a fresh pipeline, or rename the file's placeholder")
    tokenizer.add_tokens(tokens)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    embedding = text_encoder.get_input_embeddings()
    with torch.no_grad():
        embedding.weight[tokenizer.convert_tokens_to_ids(tokens)] = vectors.to(embedding.weight)
    return tokens


def describe_a1111_embedding(header: Header) -> dict[str, Any]:
    return {"kind": "textual-inversion embedding (AUTOMATIC1111/kohya format; the file name is the prompt word)"}


def _load_embeddings(pipe: Any, tokens: list[str], tensors: list) -> str:
    # diffusers' own loader: it adds the tokens (multi-vector ones expanded) and refuses known words
    pipe.load_textual_inversion(tensors, token=tokens)
    return ",".join(tokens)


def load_diffusers_embedding(pipe: Any, path: str, scale: float, name: str) -> str:
    embeddings = read_diffusers_embedding(path)
    return _load_embeddings(pipe, list(embeddings.tokens), list(embeddings.tokens.values()))


def load_a1111_embedding(pipe: Any, path: str, scale: float, name: str) -> str:
    embeddings = read_a1111_embedding(path)
    return _load_embeddings(pipe, list(embeddings.tokens), list(embeddings.tokens.values()))


def read_hypernetwork(path: str | os.PathLike, module_names: Any = None) -> hypernetworks.Hypernetwork:
    return hypernetwork_files.read(path)


def describe_hypernetwork(header: Header) -> dict[str, Any]:
    return {"kind": "hypernetwork (finetune format)"}


def _attach_hypernetwork(pipe: Any, network: Any, scale: float, name: str) -> str:
    network.set_strength(scale)
    network.eval()
    hypernetworks.attach(denoiser_of(pipe), network, name)
    return name


def load_hypernetwork(pipe: Any, path: str, scale: float, name: str) -> str:
    return _attach_hypernetwork(pipe, hypernetwork_files.read(path), scale, name)


def load_a1111_pt(pipe: Any, path: str, scale: float, name: str) -> str:
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
