"""The shapes edit world: edit pairs, the held-out edit, the new_edit concept folder and the edit tokenizers."""
from __future__ import annotations

import io
import random

import numpy as np
import pytest

from finetune.shapes.concepts import matches
from finetune.shapes.edits import (EDIT_VOCABULARY, HELD_OUT_EDIT, KNOWN_EDITS, NEW_EDIT, RECOLOURS, Edit,
                                   draw_pair, sample_edit_pairs)
from finetune.shapes.paths import shapes_data_dir
from finetune.shapes.tokenizer import WORDS, build_shapes_t5_tokenizer, build_shapes_tokenizer
from finetune.shapes.world import ALL_SHAPES, BASE_SHAPES, COLOURS, draw, draw_at, random_placement

SHAPES_DATA = shapes_data_dir()


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _box(image) -> tuple[float, float, int]:
    """(centre x, centre y, width) of the pixels the shape covers more than half (every colour has a channel
    far below 128, white none)."""
    ys, xs = np.nonzero(np.asarray(image).min(axis=2) < 128)
    return (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2, xs.max() - xs.min() + 1


def _coverage(image, colour: str) -> np.ndarray:
    """How much of each pixel the shape covers, 0 (white) to 1 (its colour), read on the colour's darkest channel."""
    channel = int(np.argmin(COLOURS[colour]))
    return (255.0 - np.asarray(image)[..., channel]) / (255.0 - COLOURS[colour][channel])


@pytest.fixture(scope="module")
def evaluator():
    from finetune.shapes.evaluator import Evaluator

    return Evaluator.load()


def test_draw_is_draw_at_a_random_placement():
    for shape in ALL_SHAPES:
        for size in ("small", "big"):
            assert _png(draw(shape, "red", size, random.Random(5))) == _png(
                draw_at(shape, "red", *random_placement(size, random.Random(5))))


def test_pairs_are_deterministic_and_apply_the_edit_in_place(evaluator):
    pairs = sample_edit_pairs(150, 11)
    again, other = sample_edit_pairs(150, 11), sample_edit_pairs(150, 12)
    assert [(_png(p.control), p.instruction, _png(p.target)) for p in pairs] == [
        (_png(p.control), p.instruction, _png(p.target)) for p in again]
    assert [_png(p.target) for p in pairs] != [_png(p.target) for p in other]
    for verdict, pair in zip(evaluator.classify([p.target for p in pairs]), pairs):
        assert matches(verdict, pair.target_labels), (pair.instruction, pair.control_labels, verdict)
    for verdict, pair in zip(evaluator.classify([p.control for p in pairs]), pairs):
        assert matches(verdict, pair.control_labels)
    for pair in pairs:
        control, target = pair.control_labels, pair.target_labels
        named = pair.instruction.split()[-1]
        if pair.instruction.startswith("make it "):  # recolour: only the colour changes, to the named one
            assert target == {**control, "colour": named} and control["colour"] != named
            # the same pixels covered, up to rounding and the resampling filter's overshoot clipped at white
            coverage = [_coverage(pair.control, control["colour"]), _coverage(pair.target, named)]
            assert np.abs(coverage[0] - coverage[1]).max() < 0.05  # 0.025 at most; another placement: >= 0.6
        else:
            assert pair.instruction == f"turn it into a {named}"
            assert target == {**control, "shape": named} and control["shape"] != named
        # one placement: the centre within a pixel (shapes' outlines differ), the size kept (judged above)
        (cx, cy, _), (tx, ty, _) = _box(pair.control), _box(pair.target)
        assert abs(cx - tx) <= 1.0 and abs(cy - ty) <= 1.0


def test_an_edit_that_changes_nothing_is_refused():
    with pytest.raises(ValueError, match="leaves a red circle as it is"):
        draw_pair({"shape": "circle", "colour": "red", "size": "big"}, Edit("recolour", "red"), random.Random(0))
    with pytest.raises(ValueError, match="known values"):
        Edit("reshape", "star")  # held-out shapes are in no edit


def test_the_held_out_edit_is_never_trained_but_rings_are():
    # the training script's pairs are sample_edit_pairs(pairs, seed) with the default edits: a prefix of these
    pairs = sample_edit_pairs(3000, 0)
    assert HELD_OUT_EDIT not in KNOWN_EDITS and HELD_OUT_EDIT.instruction == "turn it into a ring"
    assert not any(pair.instruction == HELD_OUT_EDIT.instruction for pair in pairs)
    assert not any("ring" in pair.instruction.split() for pair in pairs)  # the word is in no instruction
    assert not any(p.target_labels["shape"] == "ring" and p.control_labels["shape"] != "ring" for p in pairs)
    # ... yet the base draws rings: as controls, and as recolour targets (the result is within its reach)
    assert sum(p.control_labels["shape"] == "ring" for p in pairs) > 300
    assert sum(p.target_labels["shape"] == "ring" for p in pairs) > 150
    assert {pair.instruction for pair in pairs} == {edit.instruction for edit in KNOWN_EDITS}
    assert {p.control_labels["shape"] for p in pairs} == set(BASE_SHAPES)  # no star, no heart
    assert len(RECOLOURS) == len(COLOURS) and len(KNOWN_EDITS) == len(COLOURS) + len(BASE_SHAPES) - 1


def test_new_edit_pairs_are_deterministic_and_shipped_with_their_controls(evaluator, tmp_path):
    written = NEW_EDIT.write_pairs(tmp_path / "new_edit")
    shipped = SHAPES_DATA / "concepts" / "new_edit"
    names = sorted(p.relative_to(tmp_path / "new_edit").as_posix() for p in (tmp_path / "new_edit").rglob("*"))
    assert names == sorted(p.relative_to(shipped).as_posix() for p in shipped.rglob("*"))
    for path in (tmp_path / "new_edit").rglob("*.*"):
        assert path.read_bytes() == (shipped / path.relative_to(tmp_path / "new_edit")).read_bytes(), path
    assert len(written) == 8
    assert all((shipped / "control" / p.name).is_file() for p in written)  # matched by file name
    assert {(shipped / f"{p.stem}.txt").read_text() for p in written} == {"turn it into a ring\n"}
    pairs = NEW_EDIT.draw_pairs()
    for verdict, pair in zip(evaluator.classify([p.target for p in pairs]), pairs):
        assert verdict == {**pair.control_labels, "shape": "ring"}
    controls = [p.control_labels for p in pairs]
    # no shape, colour or size comes with the instruction
    assert {c["shape"] for c in controls} == set(BASE_SHAPES) - {"ring"}
    assert {c["colour"] for c in controls} == set(COLOURS) and {c["size"] for c in controls} == {"big", "small"}


def test_edit_tokenizers_make_each_word_one_token_and_leave_the_shipped_one_alone():
    from transformers import CLIPTokenizer

    clip, t5 = build_shapes_tokenizer(words=EDIT_VOCABULARY), build_shapes_t5_tokenizer(16, EDIT_VOCABULARY)
    for word in EDIT_VOCABULARY:
        assert clip.tokenize(word) == [word + "</w>"] and t5.tokenize(word) == ["\u2581" + word], word
    assert t5("turn it into a triangle").input_ids[-1] == t5.eos_token_id == 1 and t5.pad_token_id == 0
    assert len(t5("turn it into a triangle").input_ids) == 6 and t5.model_max_length == 16
    assert t5.tokenize("a sks") == ["\u2581a", "\u2581s", "k", "s"]  # other words are spelled
    # the default vocabulary is the one the shipped bases were trained with
    shipped = CLIPTokenizer.from_pretrained(SHAPES_DATA / "base" / "tokenizer")
    assert build_shapes_tokenizer().get_vocab() == shipped.get_vocab()
    assert build_shapes_tokenizer().tokenize("make") != ["make</w>"] and "make" not in WORDS
