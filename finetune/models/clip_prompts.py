"""Prompts longer than CLIP's window, as kohya (`--max_token_length`) and AUTOMATIC1111 encode them: the caption's
tokens cut into chunks of the window's content size (75 for CLIP's 77), each chunk with its own start and end
tokens, encoded on its own, and the hidden states concatenated along the sequence. With one chunk this is exactly
the plain encoding (start, up to 75 tokens, end, padding)."""
from __future__ import annotations

import math
from typing import Any

import torch


def content_window(tokenizer: Any) -> int:
    """Tokens of text one chunk holds: the tokenizer's window less the start and end tokens (75 for CLIP)."""
    return tokenizer.model_max_length - 2


def chunk_count(tokenizer: Any, max_token_length: int | None) -> int:
    """Chunks a caption is encoded in: 1 without max_token_length; else enough for that many tokens."""
    return 1 if not max_token_length else max(1, math.ceil(max_token_length / content_window(tokenizer)))


def token_ids(tokenizer: Any, captions: list[str], chunks: int) -> torch.Tensor:
    """[len(captions), chunks * model_max_length] ids: each chunk start + up to a window of tokens + end +
    padding; tokens past `chunks` windows are cut (as the plain encoding cuts past one)."""
    window = content_window(tokenizer)
    rows = []
    for ids in tokenizer(captions, add_special_tokens=False, truncation=False, verbose=False).input_ids:
        row = []
        for chunk in range(chunks):
            piece = ids[chunk * window:(chunk + 1) * window]
            row += [tokenizer.bos_token_id, *piece, tokenizer.eos_token_id]
            row += [tokenizer.pad_token_id] * (window - len(piece))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long)


def encode(text_encoder: Any, ids: torch.Tensor, window_length: int) -> torch.Tensor:
    """Hidden states [batch, chunks * window_length, width]: each chunk through the encoder on its own."""
    batch, length = ids.shape
    chunks = length // window_length
    states = text_encoder(ids.reshape(batch * chunks, window_length))[0]
    return states.reshape(batch, chunks * window_length, states.shape[-1])


def tokenize(tokenizer: Any, captions: list[str], max_token_length: int | None) -> torch.Tensor:
    """[batch, chunks * model_max_length] ids: the plain padded encoding, or chunks for max_token_length."""
    if max_token_length:  # kohya's / AUTOMATIC1111's long prompts: chunks of 75, each with its ends
        return token_ids(tokenizer, captions, chunk_count(tokenizer, max_token_length))
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def encode_penultimate(text_encoder: Any, ids: torch.Tensor, window_length: int
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SDXL's way: hidden states of the second-to-last layer [batch, chunks * window_length, width], and the
    projected pooled output [batch, projection] of the first chunk (None for an encoder without a projection),
    as StableDiffusionXLPipeline.encode_prompt takes them (and kohya for long prompts)."""
    batch, length = ids.shape
    chunks = length // window_length
    output = text_encoder(ids.reshape(batch * chunks, window_length), output_hidden_states=True)
    states = output.hidden_states[-2]
    pooled = output[0] if output[0].ndim == 2 else None  # CLIPTextModelWithProjection's text_embeds
    if pooled is not None:
        pooled = pooled.reshape(batch, chunks, -1)[:, 0]
    return states.reshape(batch, chunks * window_length, states.shape[-1]), pooled
