"""Captions longer than the text encoder's window (issue 19, case 01-long-caption-ti): said at start-up, an error
when a textual-inversion placeholder would be cut, and kohya's / AUTOMATIC1111's long-prompt encoding
(`data.max_token_length`) in training and sampling alike. The tiny base's tokenizer window is 32 (30 tokens of
text per chunk), so short sentences already overflow it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from finetune.adapters import trained_max_token_length
from finetune.cli import main
from finetune.data import DataError
from finetune.models import clip_prompts
from finetune.models.stable_diffusion import StableDiffusion
from finetune.recipe.load import parse_recipe
from finetune.training.loop import train
from tests.helpers import draw_concept, recipe_dict

FILLER = "a round object on a plain white background in soft studio light"  # 52 tokens on the tiny tokenizer
TI = {"kind": "textual_inversion", "placeholder_token": "<zq>", "initializer_token": "o"}


def _captioned(folder, caption):
    draw_concept(folder, count=4)
    for path in folder.glob("*.txt"):
        path.write_text(caption)
    return folder


def test_a_placeholder_past_the_window_is_refused_naming_the_images(tiny_base, tmp_path):
    images = _captioned(tmp_path / "long", f"{FILLER}, <zq>")
    recipe = parse_recipe(recipe_dict(tiny_base, images, tmp_path / "out", strategy=TI, train={"max_steps": 2}))
    with pytest.raises(DataError, match=r"4 caption\(s\) put the textual-inversion placeholder past the text "
                                        r"encoder's window of 30 tokens.*0\.png \(at token \d+.*max_token_length"):
        train(recipe)
    assert not (tmp_path / "out" / "learned_embeds.safetensors").exists()


def test_with_max_token_length_the_placeholder_trains(tiny_base, tmp_path):
    images = _captioned(tmp_path / "long", f"{FILLER}, <zq>")
    recipe = parse_recipe(recipe_dict(tiny_base, images, tmp_path / "out", strategy=TI,
                                      train={"max_steps": 2, "learning_rate": 5e-2, "adam_weight_decay": 0},
                                      data={"max_token_length": 150}))
    learned = load_file(train(recipe))["<zq>"]
    tokenizer = StableDiffusion().load(str(tiny_base)).tokenizer
    initializer = StableDiffusion().load(str(tiny_base)).text_encoder.get_input_embeddings().weight[
        tokenizer.convert_tokens_to_ids(tokenizer.tokenize("o"))[0]]
    assert not torch.allclose(learned[0], initializer)  # cut away, it stayed the initializer exactly
    assert trained_max_token_length(tmp_path / "out" / "learned_embeds.safetensors") == 150


def test_the_summary_says_how_many_captions_are_cut_and_by_how_much(tiny_base, tmp_path, capsys):
    images = _captioned(tmp_path / "long", FILLER)
    train(parse_recipe(recipe_dict(tiny_base, images, tmp_path / "out", train={"max_steps": 1})))
    out = capsys.readouterr().out
    assert "captions: 4 of 4 are longer than the text encoder's window of 30 tokens and are cut (by up to" in out
    assert "0.png" in out and "data.max_token_length: 150 or 225" in out


def test_one_chunk_is_the_plain_encoding_and_more_chunks_see_the_rest(tiny_base):
    family = StableDiffusion()
    parts = family.load(str(tiny_base))
    tokenizer = parts.tokenizer
    captions = [FILLER, "a red star"]
    plain = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
    assert torch.equal(clip_prompts.token_ids(tokenizer, captions, 1), plain)
    cut = family.encode_prompts(parts, captions)
    parts.max_token_length = 150
    whole = family.encode_prompts(parts, captions)
    assert whole.shape == (2, 5 * 32, cut.shape[-1])
    torch.testing.assert_close(whole[:, :32], cut)  # each chunk on its own: the first is the plain encoding
    ids = clip_prompts.token_ids(tokenizer, captions, 5)
    rest = tokenizer(FILLER, add_special_tokens=False).input_ids[30:60]
    second = [tokenizer.bos_token_id, *rest, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * (30 - len(rest))
    assert ids[0, 32:64].tolist() == second  # its own start and end tokens around the next 30
    # a short caption's later chunks hold its ends alone (the tiny tokenizer pads with its end token)
    assert ids[1, 32:64].tolist() == [tokenizer.bos_token_id, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * 30


def test_sampling_encodes_prompts_as_training_did(tiny_base, tmp_path):
    images = _captioned(tmp_path / "long", FILLER)

    def grids(max_token_length):
        out = tmp_path / f"out-{max_token_length}"
        data = {"max_token_length": max_token_length} if max_token_length else {}
        adapter = train(parse_recipe(recipe_dict(tiny_base, images, out, train={"max_steps": 1}, data=data)))
        found = []
        # two prompts alike in their first 30 tokens: only an encoding that reads past the window tells them apart
        for tail in ("red", "blue"):
            assert main(["sample", "--base", str(tiny_base), "--adapter", str(adapter), "--prompt", f"{FILLER}, {tail}",
                         "--steps", "2", "--num", "1", "--out", str(out / f"{tail}.png")]) == 0
            found.append(np.asarray(Image.open(out / f"{tail}.png")))
        return found

    red, blue = grids(150)
    assert not np.array_equal(red, blue)  # the adapter's 150 tokens, read from its header
    red, blue = grids(None)
    assert np.array_equal(red, blue)  # trained at the plain window: both prompts are cut alike


def test_validate_finds_the_cut_placeholder_without_a_model(tiny_base, tmp_path, capsys, monkeypatch):
    import yaml

    images = _captioned(tmp_path / "long", f"{FILLER}, <zq>")
    path = tmp_path / "ti.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(tiny_base, images, tmp_path / "out", strategy=TI)))
    monkeypatch.setattr(StableDiffusion, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main(["validate", str(path)]) == 2
    assert "past the text encoder's window of 30 tokens" in capsys.readouterr().err
    assert main(["validate", str(path), "data.max_token_length=150"]) == 0
    path.write_text(yaml.safe_dump(recipe_dict(tiny_base, images, tmp_path / "out")))
    assert main(["validate", str(path)]) == 0  # a plain LoRA: the cut is only said
    assert "captions: 4 of 4 are longer than the text encoder's window of 30 tokens" in capsys.readouterr().out
