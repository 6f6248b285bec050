"""`finetune convert` for textual-inversion embeddings: diffusers <-> AUTOMATIC1111/kohya, and A1111's .pt."""
from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from finetune import load_adapter
from finetune.cli import main
from finetune.export.textual_inversion import save_a1111_pt
from tests.helpers import pipeline


def _encoded(pipe, prompt):
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def test_diffusers_to_kohya_and_back_is_exact(tmp_path):
    vectors = torch.randn(2, 32)
    source = tmp_path / "learned_embeds.safetensors"
    save_file({"<sks>": vectors}, str(source))
    kohya, back = tmp_path / "sks.safetensors", tmp_path / "back.safetensors"
    assert main(["convert", str(source), str(kohya), "--to", "kohya"]) == 0
    assert list(load_file(kohya)) == ["emb_params"] and torch.equal(load_file(kohya)["emb_params"], vectors)
    assert main(["convert", str(kohya), str(back), "--to", "diffusers", "--token", "<sks>"]) == 0
    assert torch.equal(load_file(back)["<sks>"], vectors)


def test_kohya_embedding_loads_as_the_word_its_file_is_named(tiny_base, tmp_path):
    vectors = torch.randn(1, 32)
    source = tmp_path / "learned_embeds.safetensors"
    save_file({"<sks>": vectors}, str(source))
    kohya = tmp_path / "sks.safetensors"
    assert main(["convert", str(source), str(kohya), "--to", "kohya"]) == 0
    ours, theirs = pipeline(tiny_base), pipeline(tiny_base)
    load_adapter(ours, source)
    load_adapter(theirs, kohya)  # AUTOMATIC1111's rule: the prompt word is the file name
    torch.testing.assert_close(_encoded(theirs, "a sks photo"), _encoded(ours, "a <sks> photo"))


def test_a1111_pt_to_diffusers(tmp_path):
    vectors = torch.randn(3, 32)
    pt = save_a1111_pt(vectors, tmp_path / "style.pt", "<style>", step=10, base_model="tiny")
    out = tmp_path / "style.safetensors"
    assert main(["convert", str(pt), str(out), "--to", "diffusers", "--token", "<style>"]) == 0
    assert torch.equal(load_file(out)["<style>"], vectors)


def test_several_tokens_to_kohya_needs_token(tmp_path, capsys):
    source = tmp_path / "two.safetensors"
    save_file({"<a>": torch.randn(1, 32), "<b>": torch.randn(1, 32)}, str(source))
    assert main(["convert", str(source), str(tmp_path / "x.safetensors"), "--to", "kohya"]) == 2
    assert "--token" in capsys.readouterr().err
    assert main(["convert", str(source), str(tmp_path / "b.safetensors"), "--to", "kohya", "--token", "<b>"]) == 0
    assert torch.equal(load_file(tmp_path / "b.safetensors")["emb_params"], load_file(source)["<b>"])


def test_convert_refuses_what_it_cannot_convert(tmp_path, capsys):
    weights = tmp_path / "weights.safetensors"
    save_file({"down_blocks.0.weight": torch.zeros(2, 2)}, str(weights))
    assert main(["convert", str(weights), str(tmp_path / "o.safetensors"), "--to", "kohya"]) == 2
    assert "finetune inspect" in capsys.readouterr().err
    assert main(["convert", str(weights), str(tmp_path / "o.pt"), "--to", "kohya"]) == 2
    assert "never writes pickles" in capsys.readouterr().err
    assert not list(tmp_path.glob("o.*"))
