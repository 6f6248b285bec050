"""Textual inversion on the families whose prompts also reach T5 (SD3: CLIP-L + CLIP-G + T5; Flux: CLIP-L + T5).

The placeholder is learned in the CLIP encoders; T5 reads it as the letters typed, in training as in the pipeline
at inference. What the contract tests (test_strategy_contract.py) cannot check for these families is here: the
CLIP side starts at the initializer word, each pipeline's own way of loading the file reproduces the trained
images, and what cannot work is refused before training."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from finetune.export.adapter_files import add_embedding
from finetune.models import family_for
from finetune.models.tiny import save_tiny_pipeline
from finetune.recipe.load import parse_recipe
from finetune.strategies import create_strategy
from finetune.strategies.base import StrategySetupError
from tests.helpers import images_of, recipe_dict, saved_pipeline, train_keeping_parts

TI = {"kind": "textual_inversion", "placeholder_token": "<sks>", "initializer_token": "x"}
FAMILIES = ("sd3", "flux")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return {name: save_tiny_pipeline(tmp_path_factory.mktemp(name) / "base", family=name) for name in FAMILIES}


@pytest.fixture(scope="module")
def trained(bases, concept_dir, tmp_path_factory):
    """family -> (artifact, the trained parts): 12 steps of textual inversion ("<sks> a purple sks")."""
    runs = {}
    for name in FAMILIES:
        out = tmp_path_factory.mktemp(f"ti-{name}") / "out"
        recipe = parse_recipe(recipe_dict(bases[name], concept_dir, out, strategy={**TI, "a1111_pt": name == "flux"},
                                          train={"max_steps": 12, "learning_rate": 5e-2, "batch_size": 4}))
        runs[name] = train_keeping_parts(recipe)
    return runs


def _strategy(base, **options):
    return create_strategy(parse_recipe(recipe_dict(base, ".", "out", strategy={**TI, **options})).strategy)


@pytest.mark.parametrize("name", FAMILIES)
def test_the_clip_side_starts_at_the_initializer_word(name, bases):
    """Right after prepare, CLIP's pooled output (T5 takes no part in it) of the placeholder prompt equals the
    base's for the initializer word; the T5 states differ, since T5 reads "<sks>" as letters."""
    family = family_for(name)
    parts = family.load(str(bases[name]))
    with torch.no_grad():
        base_sequence, base_pooled = family.encode_prompts(parts, ["a purple x"])
        _strategy(bases[name]).prepare(family, parts)
        sequence, pooled = family.encode_prompts(parts, ["a purple <sks>"])
    torch.testing.assert_close(pooled, base_pooled, atol=1e-6, rtol=0)
    assert not torch.allclose(sequence, base_sequence), "T5 was expected to read the placeholder's letters"


@pytest.mark.parametrize("name", FAMILIES)
def test_several_vectors_are_refused_where_t5_reads_the_prompt(name, bases):
    family = family_for(name)
    with pytest.raises(StrategySetupError, match="num_vectors: 1"):
        _strategy(bases[name], num_vectors=2).check(family, family.load(str(bases[name])))


def test_sd3_writes_one_file_with_both_clips(trained):
    artifact, parts = trained["sd3"]
    tensors = load_file(artifact)
    assert set(tensors) == {"clip_l", "clip_g"}
    assert tensors["clip_l"].shape == (1, parts.text_encoder.config.hidden_size)
    assert tensors["clip_g"].shape == (1, parts.text_encoder_2.config.hidden_size)
    assert set(load_file(artifact.parent / "a1111" / "sks.safetensors")) == {"clip_l", "clip_g"}


def test_flux_files_load_with_the_pipelines_own_loader(trained, bases):
    """FluxPipeline.load_textual_inversion reads the diffusers file and AUTOMATIC1111's one-key file (CLIP-L's
    vectors) and draws what the trained model draws."""
    from finetune import load_adapter

    artifact, parts = trained["flux"]
    assert load_file(artifact)["<sks>"].shape == (1, parts.text_encoder.config.hidden_size)
    expected = images_of(family_for("flux").pipeline(parts), "a purple <sks>")
    untrained = images_of(saved_pipeline(bases["flux"]), "a purple <sks>")
    assert np.abs(expected - untrained).max() > 1e-3, "training did not move the images"
    stock = saved_pipeline(bases["flux"])
    stock.load_textual_inversion(str(artifact))
    np.testing.assert_allclose(images_of(stock, "a purple <sks>"), expected, atol=1e-5)
    stock_a1111 = saved_pipeline(bases["flux"])
    stock_a1111.load_textual_inversion(str(artifact.parent / "a1111" / "sks.safetensors"), token="<sks>")
    np.testing.assert_allclose(images_of(stock_a1111, "a purple <sks>"), expected, atol=1e-5)
    # AUTOMATIC1111's .pt names the word after the file ("sks"): CLIP-L gets the trained vector under that word
    pt = saved_pipeline(bases["flux"])
    assert load_adapter(pt, artifact.parent / "a1111" / "sks.pt") == "sks"
    row = pt.tokenizer.convert_tokens_to_ids("sks")
    torch.testing.assert_close(pt.text_encoder.get_input_embeddings().weight[row],
                               load_file(artifact)["<sks>"][0], atol=0, rtol=0)


def test_sd3_embedding_loads_without_a_pipeline_loader(trained, bases):
    """StableDiffusion3Pipeline has no load_textual_inversion: finetune.load_adapter adds the word to both CLIPs
    (and not to T5), and the pipeline then draws what the trained model draws."""
    from finetune import load_adapter

    artifact, parts = trained["sd3"]
    pipe = saved_pipeline(bases["sd3"])
    assert not hasattr(pipe, "load_textual_inversion")
    t5_words = len(pipe.tokenizer_3)
    assert load_adapter(pipe, artifact) == "<sks>"
    assert "<sks>" in pipe.tokenizer.get_vocab() and "<sks>" in pipe.tokenizer_2.get_vocab()
    assert len(pipe.tokenizer_3) == t5_words
    np.testing.assert_allclose(images_of(pipe, "a purple <sks>"),
                               images_of(family_for("sd3").pipeline(parts), "a purple <sks>"), atol=1e-5)


def test_adding_an_embedding_refuses_a_taken_word_and_another_width(bases):
    pipe = saved_pipeline(bases["sd3"])
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    assert add_embedding(pipe.tokenizer, pipe.text_encoder, "<new>", torch.ones(2, width)) == ["<new>", "<new>_1"]
    row = pipe.tokenizer.convert_tokens_to_ids("<new>_1")
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[row], torch.ones(width))
    with pytest.raises(ValueError, match="already in the tokenizer's vocabulary"):
        add_embedding(pipe.tokenizer, pipe.text_encoder, "<new>", torch.ones(1, width))
    with pytest.raises(ValueError, match="trained for another base"):
        add_embedding(pipe.tokenizer, pipe.text_encoder, "<other>", torch.ones(1, width + 1))
