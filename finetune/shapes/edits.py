"""The shapes edit world: pairs of (control image, instruction, target image) for a tiny edit model.

A control image is one shape as `world.draw` draws it; the target is the same shape at the same centre and
radius with one edit applied, so only what the instruction names changes:
- recolour, "make it <colour>", for each of the six colours (the control has another colour);
- reshape, "turn it into a <shape>", for the base shapes (the control is another shape), colour kept.
Size and position are kept: both images are drawn at one placement (`world.random_placement`, `world.draw_at`).
Only `world.BASE_SHAPES` appear; star and heart stay out, as for the other bases.

`HELD_OUT_EDIT` is "turn it into a ring". The edit base never trains on it, yet rings are everywhere else in its
data: as controls ("make it blue" on a red ring) and so as recolour targets, which the model draws by keeping the
control's shape. So the base can draw the result, a ring at a given place, size and colour, but has never been
asked to turn another shape into one, and the word "ring" is in none of its captions (instructions name only
the new colour or the new shape). A LoRA taught it from a handful of pairs (`NEW_EDIT`) has to bind a new
instruction to a drawing the base already makes, as an edit LoRA on a real Kontext model does; the edit
metrics (finetune.shapes.edit_metrics) then judge it on fresh controls. A ring rather than another shape because
its hole makes it unlike every other base shape, so a half-learned edit (a filled circle) is judged wrong, and
because the autoencoder carries rings well at both sizes (400 of 400 fresh ring targets, big and small, judged
right after a round trip through base/vae; measured 2026-12-07). A recolour would be a weaker test: a colour is one
global change per pixel, learned from a few pairs without any drawing.

Everything is seeded: the same arguments always give the same pairs, byte for byte.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from finetune.shapes.tokenizer import WORDS
from finetune.shapes.world import BASE_SHAPES, COLOURS, SIZES, Labels, draw_at, random_placement

# the instructions' words that the world's captions lack; the edit base's tokenizers make each one token
EDIT_WORDS: tuple[str, ...] = ("make", "it", "turn", "into")
EDIT_VOCABULARY: tuple[str, ...] = WORDS + EDIT_WORDS
EDIT_KINDS = ("recolour", "reshape")


@dataclass(frozen=True)
class Edit:
    kind: str  # "recolour" or "reshape"
    value: str  # the colour or shape the result has

    def __post_init__(self):
        known = {"recolour": tuple(COLOURS), "reshape": BASE_SHAPES}
        if self.kind not in known:
            raise ValueError(f"unknown edit kind {self.kind!r}; known: {', '.join(EDIT_KINDS)}")
        if self.value not in known[self.kind]:
            raise ValueError(f"a {self.kind} edit to {self.value!r}: known values {', '.join(known[self.kind])}")

    @property
    def label(self) -> str:
        """The label the edit sets: "colour" for a recolour, "shape" for a reshape."""
        return "colour" if self.kind == "recolour" else "shape"

    @property
    def instruction(self) -> str:
        return f"make it {self.value}" if self.kind == "recolour" else f"turn it into a {self.value}"

    def changes(self, labels: Labels) -> bool:
        """Whether the edit changes an image with these labels (a red shape is never told "make it red")."""
        return labels[self.label] != self.value

    def apply(self, labels: Labels) -> Labels:
        """The target's labels: the control's with the edited label replaced; size always kept."""
        return {**labels, self.label: self.value}


RECOLOURS: tuple[Edit, ...] = tuple(Edit("recolour", colour) for colour in COLOURS)
RESHAPES: tuple[Edit, ...] = tuple(Edit("reshape", shape) for shape in BASE_SHAPES)
HELD_OUT_EDIT = Edit("reshape", "ring")  # see the module docstring
KNOWN_EDITS: tuple[Edit, ...] = RECOLOURS + tuple(edit for edit in RESHAPES if edit != HELD_OUT_EDIT)


@dataclass(frozen=True)
class EditPair:
    control: Image.Image
    instruction: str
    target: Image.Image
    control_labels: Labels
    target_labels: Labels  # what the evaluator must see in a right result (shape, colour, size)


def draw_pair(labels: Labels, edit: Edit, rng: random.Random) -> EditPair:
    """The control with `labels` and its edited target, both at one placement drawn from `rng` (three numbers)."""
    if not edit.changes(labels):
        raise ValueError(f"{edit.instruction!r} leaves a {labels['colour']} {labels['shape']} as it is; "
                         "pick a control the edit changes (Edit.changes)")
    centre, radius = random_placement(labels["size"], rng)
    target = edit.apply(labels)
    return EditPair(draw_at(labels["shape"], labels["colour"], centre, radius), edit.instruction,
                    draw_at(target["shape"], target["colour"], centre, radius), dict(labels), target)


def sample_edit_pairs(n: int, seed: int | str, edits: Sequence[Edit] = KNOWN_EDITS,
                      shapes: Sequence[str] = BASE_SHAPES, colours: Sequence[str] = tuple(COLOURS),
                      sizes: Sequence[str] = tuple(SIZES)) -> list[EditPair]:
    """`n` random pairs: an edit drawn uniformly from `edits`, then a control (shape, colour, size) drawn uniformly
    among those in `shapes` x `colours` x `sizes` that the edit changes. Same arguments, same pairs."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        edit = rng.choice(edits)
        shape_choices = [s for s in shapes if edit.kind != "reshape" or s != edit.value]
        colour_choices = [c for c in colours if edit.kind != "recolour" or c != edit.value]
        if not shape_choices or not colour_choices:
            raise ValueError(f"no control among shapes {list(shapes)} and colours {list(colours)} that "
                             f"{edit.instruction!r} changes; widen them")
        labels = {"shape": rng.choice(shape_choices), "colour": rng.choice(colour_choices),
                  "size": rng.choice(sizes)}
        pairs.append(draw_pair(labels, edit, rng))
    return pairs


@dataclass(frozen=True)
class EditConcept:
    """An edit to teach from a handful of pairs, shipped as a concept folder with a control/ subfolder."""
    name: str
    edit: Edit
    controls: tuple[tuple[str, str, str], ...]  # (shape, colour, size) of each example's control
    seed: int

    def draw_pairs(self) -> list[EditPair]:
        rng = random.Random(self.seed)
        return [draw_pair({"shape": shape, "colour": colour, "size": size}, self.edit, rng)
                for shape, colour, size in self.controls]

    def write_pairs(self, folder: str | Path) -> list[Path]:
        """Each pair as `<i>.png` (target) + `<i>.txt` (instruction) and `control/<i>.png`: the layout
        `data.control: {folders: [control]}` reads (a control matched to its target by file name)."""
        folder = Path(folder)
        (folder / "control").mkdir(parents=True, exist_ok=True)
        written = []
        for i, pair in enumerate(self.draw_pairs()):
            pair.target.save(folder / f"{i}.png")
            (folder / f"{i}.txt").write_text(pair.instruction + "\n")
            pair.control.save(folder / "control" / f"{i}.png")
            written.append(folder / f"{i}.png")
        return written


# eight rings made from every other base shape, all six colours and both sizes, so no shape, colour or size
# comes with the instruction
_NEW_EDIT_CONTROLS = tuple(
    (shape, colour, size) for shape, colour, size in zip(
        ("circle", "square", "triangle", "cross", "diamond", "circle", "square", "triangle"),
        ("red", "green", "blue", "yellow", "purple", "orange", "blue", "red"),
        ("big", "small") * 4))
NEW_EDIT = EditConcept(name="new_edit", edit=HELD_OUT_EDIT, controls=_NEW_EDIT_CONTROLS, seed=303)
