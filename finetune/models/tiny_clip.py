"""The tiny CLIP pieces every tiny pipeline with a CLIP text encoder shares: a character-level tokenizer and a
random two-layer encoder. tiny.py (SD, SDXL), tiny_transformers.py and the families' own tiny builders import them
from here, so neither tiny module imports the other."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path


def byte_alphabet() -> list[str]:
    """The 256 characters CLIP's byte-level BPE stands for the byte values with, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def build_tokenizer(max_length: int = 32, pad_token: str | None = None):
    """A character-level CLIP tokenizer (the byte alphabet, no merges), `max_length` tokens long. `pad_token`: SDXL's
    second tokenizer pads with "!" in the released model, not with the end token."""
    from transformers import CLIPTokenizer

    alphabet = byte_alphabet()
    vocab = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(str(Path(folder) / "vocab.json"), str(Path(folder) / "merges.txt"),
                             model_max_length=max_length, **({"pad_token": pad_token} if pad_token else {}))


def clip_text_model(tokenizer, width: int, with_projection: bool = False):
    """A random two-layer CLIP text encoder `width` wide for `tokenizer` (with a projection: CLIP-G's kind)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length, projection_dim=width,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
