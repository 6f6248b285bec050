"""Textual inversion (Gal et al. 2022): new token embeddings learn the concept; every other weight stays put.

Each placeholder becomes `num_vectors` tokens named as diffusers' loader names them (`<tok>`, `<tok>_1`, ...),
so prompts expand the same way in training and in `pipe.load_textual_inversion`. After every optimizer step
all embedding rows but the new ones are copied back from the untouched matrix, so they stay bit-identical
whatever the optimizer (weight decay included) did to them. Every CLIP text encoder the family has (one for SD
and Flux, clip_l and clip_g for SDXL and SD3) gets the tokens. A T5 encoder (SD3, Flux) is left alone: it reads
the placeholder as the letters typed, in training as in the pipeline at inference, so the CLIP vectors learn
the concept beside what T5 makes of those letters.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from finetune.draws import host_choices
from finetune.export import textual_inversion as ti_files
from finetune.models.base import Components, ModelFamily
from finetune.recipe.keys import key, required
from finetune.recipe.schema import StrategyOptions
from finetune.strategies.base import StrategySetupError, held_in, unchanged_base

# prompts for `prompts: object` / `style` (the concept shown as a thing, or as a way of drawing)
OBJECT_TEMPLATES = ("a photo of a {}", "a picture of a {}", "a rendering of a {}", "a close-up photo of a {}",
                    "a bright photo of the {}", "a cropped photo of a {}", "a good photo of a {}", "a {}")
STYLE_TEMPLATES = ("a painting in the style of {}", "a picture in the style of {}", "an artwork in the style of {}",
                   "a drawing in the style of {}", "a rendering in the style of {}")


class PlaceholderError(StrategySetupError):
    """A placeholder or initializer word that cannot work with this tokenizer."""


@dataclass
class Options(StrategyOptions):
    placeholder_token: list[str] = required(
        "The new word the concept is learned as, e.g. `<sks>`, or a list of several; each must not be in the "
        "tokenizer's vocabulary already.")
    initializer_token: list[str] = required(
        "A word of the base's vocabulary that tokenizes as one token, whose embedding every new vector starts from: "
        "one for all placeholders, or one per placeholder.")
    num_vectors: int = key(1, "Vectors per placeholder: prompts expand `<sks>` to `<sks> <sks>_1 ...`, as diffusers' "
                              "loader does.", minimum=1)
    prompts: Literal["captions", "object", "style"] = key(
        "captions", "What the images are trained with: `captions`, the data's captions (a caption without a "
                    "placeholder gets the first one put in front); `object` or `style`, templates such as \"a photo of "
                    "a {}\" around the first placeholder.")
    a1111_pt: bool = key(False, "Also write AUTOMATIC1111's pickled `.pt` (plain data only); the `.safetensors` "
                                "embedding is always written.")

    def changes_text_encoding(self) -> Optional[str]:
        return "textual inversion trains the new words' embeddings inside the text encoder"

    def validate(self, recipe: Any) -> list[str]:
        problems = []  # a key's own bounds are declared on it (finetune/recipe/keys.py)
        tokens = self.placeholder_token or []
        if len(set(tokens)) != len(tokens):
            problems.append(f"strategy.placeholder_token: each placeholder once, got {tokens}")
        if tokens and self.initializer_token and len(self.initializer_token) not in (1, len(tokens)):
            problems.append(f"strategy.initializer_token: one word, or one per placeholder ({len(tokens)}), "
                            f"got {len(self.initializer_token)}")
        for token in tokens:
            if not token.strip() or any(ch.isspace() for ch in token):
                problems.append(f"strategy.placeholder_token: {token!r} must be one word without spaces, "
                                "e.g. <sks>")
        return problems


def _word(token: str) -> re.Pattern:
    """`token` as a whole word: not part of a longer word, punctuation after it allowed."""
    return re.compile(rf"(?<!\S){re.escape(token)}(?=$|[\s,.;:!?)])")


def vector_tokens(token: str, num_vectors: int) -> list[str]:
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def check_placeholders(tokenizer, placeholders: list[str], initializers: list[str]) -> list[int]:
    """The initializer words' token ids; a clear error for anything that cannot work."""
    vocab = tokenizer.get_vocab()
    for token in placeholders:
        pieces = tokenizer.tokenize(token)
        if token in vocab or (len(pieces) == 1 and pieces[0] in vocab and pieces[0].replace("</w>", "") == token):
            raise PlaceholderError(
                f"strategy.placeholder_token: {token!r} is already in the tokenizer's vocabulary, so its meaning "
                f"would be overwritten; pick a string the vocabulary lacks, e.g. '<{token.strip('<>')}-concept>'")
    ids = []
    for word in initializers:
        pieces = tokenizer.tokenize(word)
        if len(pieces) != 1:
            raise PlaceholderError(
                f"strategy.initializer_token: {word!r} is {len(pieces)} tokens ({', '.join(pieces)}), not one; "
                "pick a single-token word close to the concept (a common noun such as 'dog' or 'toy'; "
                "check with tokenizer.tokenize(word))")
        ids.append(tokenizer.convert_tokens_to_ids(pieces[0]))
    return ids


class Strategy:
    artifact_name = ti_files.FILE_NAME

    def __init__(self, options: Options):
        self.options = options
        self.encoders: dict[str, torch.nn.Module] = {}  # family's encoder name -> text encoder
        self.file_keys: dict[str, str] = {}  # encoder name -> its key in the file (SDXL: clip_l, clip_g)
        self.rows: dict[str, torch.Tensor] = {}  # encoder name -> ids of the new rows, placeholder-major
        self.untouched: dict[str, torch.Tensor] = {}  # encoder name -> embedding matrix as it was
        self.frozen_masks: dict[str, torch.Tensor] = {}  # encoder name -> [vocabulary, 1] rows kept as they were

    @property
    def placeholders(self) -> list[str]:
        return list(self.options.placeholder_token)

    @property
    def initializers(self) -> list[str]:
        words = list(self.options.initializer_token)
        return words * len(self.placeholders) if len(words) == 1 else words

    def check(self, family: ModelFamily, parts: Components) -> None:
        encoders = family.text_encoders(parts)
        # an embedding file needs a loader: the pipeline's own, or finetune's for the per-encoder layout
        if not hasattr(family.pipeline(parts), "load_textual_inversion") and not family.embedding_keys:
            raise StrategySetupError(
                f"strategy.kind: textual inversion on {family.name} is not written yet (its diffusers pipeline has "
                "no embedding loader and no embedding file layout is defined for its text encoder); use lora")
        if len(encoders) < len(parts.text_encoder_names) and self.options.num_vectors > 1:
            # T5 reads the prompt as typed: the pipelines expand `<tok>` to `<tok> <tok>_1 ...` for CLIP only
            # (FluxPipeline) or not at all (SD3), so training could not show T5 what sampling shows it
            raise StrategySetupError(
                f"strategy.num_vectors: {family.name}'s T5 encoder reads the placeholder as typed, and the "
                "pipeline expands a multi-vector placeholder for CLIP only; set strategy.num_vectors: 1")
        for _, tokenizer, _ in encoders:
            check_placeholders(tokenizer, self.placeholders, self.initializers)
        if len(encoders) > 1 and len(self.placeholders) > 1:
            raise StrategySetupError(
                f"strategy.placeholder_token: {family.name} has {len(encoders)} text encoders, and its embedding "
                "file (clip_l, clip_g) holds one placeholder; train one placeholder per run")
        if len(encoders) > 1 and self.options.a1111_pt:
            raise StrategySetupError(
                f"strategy.a1111_pt: AUTOMATIC1111's .pt holds one text encoder's vectors; {family.name} embeddings "
                "are written as .safetensors with clip_l and clip_g, which AUTOMATIC1111 reads; remove a1111_pt")

    def prepare(self, family: ModelFamily, parts: Components, keep_frozen_base: bool = False) -> None:
        o = self.options
        for name, tokenizer, encoder in family.text_encoders(parts):
            init_ids = check_placeholders(tokenizer, self.placeholders, self.initializers)
            new_tokens = [t for p in self.placeholders for t in vector_tokens(p, o.num_vectors)]
            tokenizer.add_tokens(new_tokens)
            encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            encoder.requires_grad_(False)
            embedding = encoder.get_input_embeddings()
            if embedding.weight.dtype != torch.float32:
                # the encoder's other layers get its vectors in their own dtype, as from a pipeline that loaded the
                # embedding (without: fp32 meets a bf16 layer norm, which a CPU refuses, "mixed dtype (CPU)")
                embedding.register_forward_hook(partial(_in_dtype, embedding.weight.dtype))
            embedding.float()  # the trained rows are fp32 whatever the base's dtype
            rows = torch.tensor(tokenizer.convert_tokens_to_ids(new_tokens), device=embedding.weight.device)
            with torch.no_grad():
                seeds = torch.tensor(init_ids, device=rows.device).repeat_interleave(o.num_vectors)
                embedding.weight[rows] = embedding.weight[seeds]
            embedding.weight.requires_grad_(True)
            self.encoders[name], self.rows[name] = encoder, rows
            self.file_keys[name] = getattr(family, "embedding_keys", {}).get(name, name)
            self.untouched[name] = embedding.weight.detach().clone()

    def parameter_groups(self, learning_rate: float) -> list[dict[str, Any]]:
        return [{"params": [e.get_input_embeddings().weight for e in self.encoders.values()], "lr": learning_rate,
                 "weight_decay": 0.0}]  # decay would pull the new vectors towards zero, away from the word

    def prompts(self, captions: list[str], generator: torch.Generator) -> list[str]:
        first = self.placeholders[0]
        if self.options.prompts == "captions":
            texts = [c if any(_word(p).search(c) for p in self.placeholders) else f"{first} {c}".strip()
                     for c in captions]
        else:
            templates = OBJECT_TEMPLATES if self.options.prompts == "object" else STYLE_TEMPLATES
            texts = [template.format(first) for template in host_choices(len(captions), templates, generator)]
        return [self._expand(text) for text in texts]

    def kept_words(self) -> list[str]:
        # a placeholder cut from a caption is never trained (issue 19, case 01-long-caption-ti)
        return [t for p in self.placeholders for t in vector_tokens(p, self.options.num_vectors)]

    def _expand(self, text: str) -> str:
        # the same expansion diffusers' maybe_convert_prompt applies at inference: <tok> -> <tok> <tok>_1 ...
        for token in self.placeholders:
            text = _word(token).sub(" ".join(vector_tokens(token, self.options.num_vectors)), text)
        return text

    frozen_base = staticmethod(unchanged_base)  # the base's own prompts never reach the new rows

    def as_loaded(self, dtype: torch.dtype):
        # diffusers' load_textual_inversion and finetune.load_adapter put the vectors in the encoder's dtype
        return held_in([encoder.get_input_embeddings() for encoder in self.encoders.values()], dtype)

    def on_step_end(self, step: int) -> bool:
        with torch.no_grad():
            for name, encoder in self.encoders.items():
                weight = encoder.get_input_embeddings().weight
                # every row but the new tokens' back to the base's: torch.where, not weight[keep] = ..., since
                # indexing by a boolean mask counts its True values on the host (a wait for the GPU every step)
                weight.copy_(torch.where(self._frozen_rows(name, weight), self.untouched[name], weight))
        return False  # what trains never changes

    def _frozen_rows(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """[vocabulary, 1] True for the rows that must keep the base's vectors; made once per encoder."""
        if name not in self.frozen_masks:
            keep = torch.ones(weight.shape[0], 1, dtype=torch.bool, device=weight.device)
            keep[self.rows[name]] = False
            self.frozen_masks[name] = keep
        return self.frozen_masks[name]

    def learned(self) -> dict[str, dict[str, torch.Tensor]]:
        """placeholder -> encoder's file key (its name; SDXL's clip_l, clip_g) -> tensor[num_vectors, dim]."""
        n = self.options.num_vectors
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name, encoder in self.encoders.items():
            weight = encoder.get_input_embeddings().weight.detach()
            for i, token in enumerate(self.placeholders):
                out.setdefault(token, {})[self.file_keys[name]] = weight[self.rows[name][i * n:(i + 1) * n]].float().cpu().clone()
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{token}": vectors for token, per in self.learned().items() for name, vectors in per.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        n = self.options.num_vectors
        with torch.no_grad():
            for name, encoder in self.encoders.items():
                weight = encoder.get_input_embeddings().weight
                for i, token in enumerate(self.placeholders):
                    weight[self.rows[name][i * n:(i + 1) * n]] = state[f"{self.file_keys[name]}.{token}"].to(weight)

    def save(self, output_dir: Path, metadata: dict[str, str]) -> Path:
        meta = {**metadata, "finetune.num_vectors": str(self.options.num_vectors),
                "finetune.placeholder_token": ",".join(self.placeholders)}
        return ti_files.save_all(Path(output_dir), self.learned(), meta, pt=self.options.a1111_pt)


def _in_dtype(dtype: torch.dtype, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: the embedding's output in `dtype` (the gradient flows back through the cast)."""
    return output.to(dtype)
