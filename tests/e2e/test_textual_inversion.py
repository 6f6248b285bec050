"""Textual inversion: only the new embedding rows train; the three file formats load back."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from finetune import load_adapter
from finetune.cli import main
from finetune.recipe.load import RecipeError, parse_recipe
from finetune.strategies.textual_inversion import PlaceholderError
from finetune.training import loop
from tests.helpers import recipe_dict

TI = {"kind": "textual_inversion", "placeholder_token": "<sks>", "initializer_token": "x", "num_vectors": 2}
TRAIN = {"max_steps": 3, "batch_size": 2, "learning_rate": 5e-2, "seed": 0}


def _pipe(path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(path))


def _train_capturing(recipe):
    """Train, and keep the components the loop trained (to look at every weight afterwards)."""
    with loop.setup(recipe) as run:
        loop.run_steps(run)
        artifact = loop.finish(run)
    return artifact, {"parts": run.parts, "strategy": run.strategy}


def test_only_the_new_rows_change(tiny_base, concept_dir, tmp_path):
    base = _pipe(tiny_base)
    recipe = parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "out", strategy=TI, train=TRAIN,
                                      data={"caption_dropout": 0.0}))
    artifact, seen = _train_capturing(recipe)
    parts, strategy = seen["parts"], seen["strategy"]
    tokenizer = parts.tokenizer
    new_ids = tokenizer.convert_tokens_to_ids(["<sks>", "<sks>_1"])
    weight = strategy.encoders["text_encoder"].get_input_embeddings().weight.detach()
    old = base.text_encoder.get_input_embeddings().weight.detach()
    assert weight.shape[0] == old.shape[0] + 2
    assert torch.equal(weight[:old.shape[0]], old)  # every old row bit-identical, though its tokens were used
    init = old[tokenizer.convert_tokens_to_ids("x</w>")]
    assert not torch.equal(weight[new_ids[0]], init) and not torch.equal(weight[new_ids[1]], init)  # they trained
    for name in ("unet", "vae"):
        for (key, a), b in zip(getattr(base, name).state_dict().items(), getattr(parts, name).state_dict().values()):
            assert torch.equal(a, b), f"{name}.{key}"
    text_state = parts.text_encoder.state_dict()
    for key, value in base.text_encoder.state_dict().items():
        if "token_embedding" not in key:
            assert torch.equal(value, text_state[key]), key
    learned = load_file(artifact)
    assert list(learned) == ["<sks>"] and learned["<sks>"].shape == (2, 32)
    torch.testing.assert_close(learned["<sks>"], weight[new_ids])


@pytest.mark.parametrize("width", [768, 1024])
def test_wide_text_encoders(width, tmp_path, concept_dir):
    from finetune.models.tiny import build_tiny_pipeline

    base = tmp_path / "base"
    build_tiny_pipeline(cross_attention_dim=width).save_pretrained(base)
    recipe = parse_recipe(recipe_dict(base, concept_dir, tmp_path / "out", strategy=TI,
                                      train={**TRAIN, "max_steps": 1}))
    learned = load_file(loop.train(recipe))
    assert learned["<sks>"].shape == (2, width)


@pytest.fixture(scope="module")
def trained_files(tiny_base, concept_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ti") / "out"
    recipe = parse_recipe(recipe_dict(tiny_base, concept_dir, out, strategy={**TI, "a1111_pt": True},
                                      train=TRAIN, checkpoint={"every": 0, "snapshot_every": 2}))
    artifact = loop.train(recipe)
    return out, load_file(artifact)["<sks>"]


def test_diffusers_loads_learned_embeds(tiny_base, trained_files):
    out, vectors = trained_files
    pipe = _pipe(tiny_base)
    pipe.load_textual_inversion(str(out / "learned_embeds.safetensors"))
    ids = pipe.tokenizer.convert_tokens_to_ids(["<sks>", "<sks>_1"])
    torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[ids], vectors)
    assert pipe.maybe_convert_prompt("a <sks> star", pipe.tokenizer) == "a <sks> <sks>_1 star"


@pytest.mark.parametrize("relative, token", [("learned_embeds.safetensors", "<sks>"),
                                             ("a1111/sks.safetensors", "sks"), ("a1111/sks.pt", "sks")])
def test_load_adapter_reads_all_three_formats(tiny_base, trained_files, relative, token):
    out, vectors = trained_files
    pipe = _pipe(tiny_base)
    load_adapter(pipe, out / relative)
    ids = pipe.tokenizer.convert_tokens_to_ids([token, f"{token}_1"])
    torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[ids], vectors)


def test_a1111_files_hold_their_formats(trained_files):
    out, vectors = trained_files
    assert list(load_file(out / "a1111" / "sks.safetensors")) == ["emb_params"]
    pt = torch.load(out / "a1111" / "sks.pt", weights_only=True)  # plain data: no code runs on load
    assert pt["string_to_token"] == {"*": 265} and pt["name"] == "sks" and pt["step"] == 3
    torch.testing.assert_close(pt["string_to_param"]["*"], vectors)


def test_snapshots_every_n_steps(trained_files):
    out, _ = trained_files
    snapshots = sorted(p.parent.name for p in (out / "snapshots").glob("*/learned_embeds.safetensors"))
    assert snapshots == ["step-000002"]


@pytest.mark.parametrize("strategy, problem", [
    ({**TI, "placeholder_token": "a"}, "already in the tokenizer's vocabulary"),
    ({**TI, "initializer_token": "xy"}, r"'xy' is 2 tokens \(x, y</w>\), not one"),
])
def test_placeholders_that_cannot_work_fail_before_training(tiny_base, concept_dir, tmp_path, strategy, problem,
                                                            capsys):
    recipe = parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "out", strategy=strategy, train=TRAIN))
    with pytest.raises(PlaceholderError, match=problem):
        loop.train(recipe)
    assert not (tmp_path / "out" / "learned_embeds.safetensors").exists()


@pytest.mark.parametrize("strategy, problem", [
    ({**TI, "num_vectors": 0}, "strategy.num_vectors: must be at least 1"),
    ({"kind": "textual_inversion", "initializer_token": "x"}, "strategy.placeholder_token: required, but missing"),
    ({**TI, "placeholder_token": ["<a>", "<b>", "<c>"], "initializer_token": ["x", "y"]}, "one per placeholder"),
])
def test_bad_options_are_named_by_validate(tiny_base, concept_dir, tmp_path, strategy, problem):
    with pytest.raises(RecipeError, match=problem):
        parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "out", strategy=strategy))


def test_cli_exits_2_on_a_known_word(tiny_base, concept_dir, tmp_path, capsys):
    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(tiny_base, concept_dir, tmp_path / "out",
                                                 strategy={**TI, "placeholder_token": "a"}, train=TRAIN)))
    assert main(["train", str(recipe)]) == 2
    assert "already in the tokenizer's vocabulary" in capsys.readouterr().err
