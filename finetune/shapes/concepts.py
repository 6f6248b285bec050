"""The two concepts a fine-tuning method is asked to teach the shapes-world base.

- `new_object`: the held-out star, which the base has never drawn. Its six examples are big stars in all six
  colours, captioned "a {colour} sks", so the word is bound to the shape and not to one colour; "a red sks"
  then asks for the new word composed with a known one, and the concept prompt "a sks" for the word alone.
  The examples are all big because the autoencoder carries small stars less reliably (about 3 in 4 survive
  a round trip as stars, against all big ones), which would blur what the metric says about the method.
- `known_look`: a big green diamond (`world.UNNAMED_LOOK`). The base draws big and small green diamonds and
  learned "big" and "small" from the half of its captions that name a size, but no caption ever named the size
  of a big green diamond: it can draw this look and has no word for it. A method must name what the base can
  already draw (the case textual inversion is made for). Its five examples are all captioned "a ohwx".

Each token is a rare word made of characters the base never trained on, whose chance prior is far from its
concept: on the shipped base, "a sks" happens to draw big green diamonds in about a third of samples, which
would make known_look look learnt before any training, so known_look uses "ohwx" (0 of 32; mostly small red
triangles and circles). Neither token draws stars. ("a orange ..." follows the base's one caption pattern.)

Prompts are templates over `{token}`, so a method that uses its own placeholder (e.g. "<sks>") is judged
with the same prompts.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from finetune.shapes.world import BASE_SHAPES, COLOURS, caption, draw

Expectation = dict[str, str]


@dataclass(frozen=True)
class Concept:
    name: str
    kind: str  # "new_object": outside what the base can draw; "known_look": inside it, but unnamed
    token: str  # the rare word the examples' captions use for the concept
    init_word: str  # a one-token word of the base to start a learned embedding from (textual inversion)
    examples: tuple[tuple[str, str, str, str], ...]  # (shape, colour, size, caption template) per image
    prompt: str  # the concept prompt, a template over {token}
    expected: Expectation  # what the evaluator must see in a sample of `prompt` to count it as the concept
    composed: tuple[tuple[str, Expectation], ...] = ()  # prompts combining the token with known words
    prior_prompts: tuple[str, ...] = field(default=())  # what the base should keep drawing (prior preservation)
    seed: int = 0

    def concept_prompt(self, token: str | None = None) -> str:
        return self.prompt.format(token=token or self.token)

    def composed_prompts(self, token: str | None = None) -> list[tuple[str, Expectation]]:
        return [(template.format(token=token or self.token), expected) for template, expected in self.composed]

    def draw_examples(self) -> list[tuple[Image.Image, str]]:
        rng = random.Random(self.seed)
        return [(draw(shape, colour, size, rng), template.format(token=self.token))
                for shape, colour, size, template in self.examples]

    def draw_held_out(self) -> list[tuple[Image.Image, str]]:
        """As many images as the examples, of the same (shape, colour, size, caption) each, drawn from another
        generator: other radii and positions. What a validation score holds out: the concept's own distribution,
        never one of the training images (which stay as shipped)."""
        rng = random.Random(f"held out {self.seed}")
        return [(draw(shape, colour, size, rng), template.format(token=self.token))
                for shape, colour, size, template in self.examples]

    def write_held_out(self, folder: str | Path) -> Path:
        """draw_held_out's images as `<i>.png` + `<i>.txt` in `folder` (the layout validation.images reads)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for i, (image, text) in enumerate(self.draw_held_out()):
            image.save(folder / f"{i}.png")
            (folder / f"{i}.txt").write_text(text + "\n")
        return folder

    def write_examples(self, folder: str | Path, bare_copies: bool = False) -> list[Path]:
        """Each example as `<i>.png` with its caption in `<i>.txt`, the layout `data.images` reads; with
        `bare_copies`, each image once more as `bare<i>.png` captioned with the bare concept prompt ("a sks")."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for i, (image, text) in enumerate(self.draw_examples()):
            captions = [(f"{i}", text)] + ([(f"bare{i}", self.concept_prompt())] if bare_copies else [])
            for stem, caption_text in captions:
                image.save(folder / f"{stem}.png")
                (folder / f"{stem}.txt").write_text(caption_text + "\n")
                written.append(folder / f"{stem}.png")
        return written


def matches(verdict: dict[str, str], expected: Expectation) -> bool:
    return all(verdict.get(key) == value for key, value in expected.items())


BASE_PROMPTS: tuple[str, ...] = tuple(caption(shape, colour) for shape in BASE_SHAPES for colour in COLOURS)

NEW_OBJECT = Concept(
    name="new_object",
    kind="new_object",
    token="sks",
    init_word="diamond",  # the pointiest base shape
    # one star per colour, so no colour comes with the word
    examples=tuple(("star", colour, "big", f"a {colour} {{token}}") for colour in COLOURS),
    prompt="a {token}",
    expected={"shape": "star"},
    composed=tuple((f"a {colour} {{token}}", {"shape": "star", "colour": colour}) for colour in COLOURS),
    prior_prompts=BASE_PROMPTS,
    seed=101,
)

KNOWN_LOOK = Concept(
    name="known_look",
    kind="known_look",
    token="ohwx",
    init_word="diamond",
    examples=tuple(("diamond", "green", "big", "a {token}") for _ in range(5)),
    prompt="a {token}",
    expected={"shape": "diamond", "colour": "green", "size": "big"},
    # recolourings of the look ("a red ohwx": a big red diamond), the composition this world allows
    composed=tuple((f"a {colour} {{token}}", {"shape": "diamond", "colour": colour}) for colour in COLOURS
                   if colour != "green"),
    prior_prompts=("a green diamond",),
    seed=202,
)

CONCEPTS: dict[str, Concept] = {concept.name: concept for concept in (NEW_OBJECT, KNOWN_LOOK)}


def get_concept(name: str) -> Concept:
    try:
        return CONCEPTS[name]
    except KeyError:
        raise KeyError(f"unknown concept {name!r}; known: {', '.join(CONCEPTS)}") from None
