"""Caption lengths against the text encoder's window, said before training: how many captions are cut and by how
much, and an error when a word that must be trained (a textual-inversion placeholder) would be cut away."""
from __future__ import annotations

import copy
from typing import Any

from finetune.data.sources import DataError, some


def caption_report(tokenizer: Any, texts: list[str], names: list[str], window: int,
                   kept_words: list[str] = ()) -> list[str]:
    """Lines for the data summary about the `texts` (what training encodes) longer than `window` tokens of text;
    raises DataError naming the images when one of `kept_words` (added to a copy of the tokenizer, as training
    adds them) lies beyond the window."""
    if kept_words:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.add_tokens(list(kept_words))
    kept_ids = set(tokenizer.convert_tokens_to_ids(list(kept_words)))
    lost, long = [], []
    encoded = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False).input_ids
    for name, ids in zip(names, encoded):
        if len(ids) > window:
            long.append((name, len(ids) - window))
            cut = [position for position, token in enumerate(ids) if token in kept_ids and position >= window]
            if cut:
                lost.append(f"{name} (at token {cut[0] + 1} of {len(ids)})")
    if lost:
        raise DataError(
            f"{len(lost)} caption(s) put the textual-inversion placeholder past the text encoder's window of "
            f"{window} tokens, so it would be cut away and never trained: {some(lost, separator='; ')}. Move the "
            "placeholder to the start of those captions, shorten them, or set data.max_token_length: 150 or 225 "
            "(kohya's and AUTOMATIC1111's long-prompt encoding)")
    if not long:
        return []
    worst = max(over for _, over in long)
    return [f"captions: {len(long)} of {len(texts)} are longer than the text encoder's window of {window} tokens "
            f"and are cut (by up to {worst} tokens): {some([n for n, _ in long], limit=3)}. "
            "data.max_token_length: 150 or 225 encodes them whole, as kohya and AUTOMATIC1111 do"]
