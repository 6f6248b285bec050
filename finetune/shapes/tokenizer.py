"""A word-level CLIP tokenizer for the shapes world.

Every word of the world's language (shape and colour names, held-out shapes included, "a", "big", "small")
is one token, so a caption is a handful of tokens and fits the text encoder's 16 positions. Any other word
(e.g. a rare identifier such as "sks") falls back to byte-level characters, as in CLIP, so every prompt
tokenizes. It is a plain `transformers.CLIPTokenizer` built from a generated vocab.json + merges.txt; adding
tokens later (textual inversion) works as for any CLIP tokenizer.

`build_shapes_t5_tokenizer` is the same idea for a T5 encoder (the edit base's `tokenizer_2`): one Unigram piece
per word, characters for anything else. Both take `words` so the edit world can add its instruction words
("make", "turn", ...); the defaults are the world's words, which the shipped bases were trained with.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from finetune.models.tiny_clip import byte_alphabet
from finetune.shapes.world import ALL_SHAPES, COLOURS, SIZES

MAX_LENGTH = 16
WORDS: tuple[str, ...] = ("a",) + tuple(COLOURS) + ALL_SHAPES + tuple(SIZES)
END_OF_WORD = "</w>"


def _symbols(word: str) -> list[str]:
    # CLIP's BPE splits a word into characters and marks the last one as ending the word
    return list(word[:-1]) + [word[-1] + END_OF_WORD]


def _apply_merges(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE: repeatedly merge the adjacent pair with the lowest rank until none is known."""
    symbols = _symbols(word)
    while len(symbols) > 1:
        pairs = [(symbols[i], symbols[i + 1]) for i in range(len(symbols) - 1)]
        best = min(pairs, key=lambda pair: ranks.get(pair, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def word_merges(words: tuple[str, ...] = WORDS) -> list[tuple[str, str]]:
    """Merges under which each word becomes a single token.

    A merge appended last has the lowest priority, so it only fires in a word where no earlier merge
    applies: words already reduced to one token stay so, and each word is finished by appending merges
    of its leftmost pair until it is one token.
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        while len(symbols := _apply_merges(word, ranks)) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
    return merges


def build_shapes_tokenizer(max_length: int = MAX_LENGTH, words: tuple[str, ...] = WORDS):
    """A CLIPTokenizer with each of `words` one token and `max_length` positions (the text encoder's)."""
    from transformers import CLIPTokenizer

    alphabet = byte_alphabet()
    merges = word_merges(words)
    vocab = alphabet + [c + END_OF_WORD for c in alphabet]
    vocab += [left + right for left, right in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as folder:
        vocab_file, merges_file = Path(folder) / "vocab.json", Path(folder) / "merges.txt"
        vocab_file.write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
        merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=max_length)


def build_shapes_t5_tokenizer(max_length: int, words: tuple[str, ...] = WORDS):
    """A T5Tokenizer (Unigram, built in memory; <pad>=0, </s>=1, <unk>=2 as T5 has them) that makes each of `words`
    one token ("\u2581red") and spells any other printable word in characters; `model_max_length` = `max_length`,
    the token count a Flux-style pipeline must pad to (min(512, model_max_length)) so sampling matches training."""
    from transformers import T5Tokenizer

    chars = [chr(c) for c in range(ord(" ") + 1, ord("~") + 1)]
    # a whole word (score -1) beats its spelling (-2.5 for the first character, -3 for each next one)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in chars] + [("\u2581" + c, -2.5) for c in chars]
    vocab += [("\u2581" + word, -1.0) for word in words if len(word) > 1]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    tokenizer.model_max_length = max_length
    return tokenizer
