"""The shapes world: generator, tokenizer, concepts, and the shipped base model and evaluator."""
from __future__ import annotations

import io
from pathlib import Path

import pytest

from finetune.shapes.checksums import mismatches, sha256_of
from finetune.shapes.concepts import CONCEPTS, KNOWN_LOOK, NEW_OBJECT
from finetune.shapes.paths import shapes_data_dir
from finetune.shapes.tokenizer import WORDS, build_shapes_tokenizer
from finetune.shapes.world import (ALL_SHAPES, BASE_SHAPES, HELD_OUT_SHAPES, UNNAMED_LOOK, caption,
                                   sample_dataset)

SHAPES_DATA = shapes_data_dir()


def _png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_generator_is_deterministic_per_seed():
    first, again, other = (sample_dataset(12, seed) for seed in (7, 7, 8))
    assert [_png_bytes(im) for im, _, _ in first] == [_png_bytes(im) for im, _, _ in again]
    assert [c for _, c, _ in first] == [c for _, c, _ in again]
    assert [_png_bytes(im) for im, _, _ in first] != [_png_bytes(im) for im, _, _ in other]


def test_images_are_32px_rgb_and_captions_match_labels():
    for image, text, labels in sample_dataset(60, 1, shapes=ALL_SHAPES):
        assert image.size == (32, 32) and image.mode == "RGB"
        assert text == caption(labels["shape"], labels["colour"]) == f"a {labels['colour']} {labels['shape']}"
        assert labels["size"] not in text.split()  # without name_sizes, captions never say the size


def test_base_captions_name_the_size_except_for_the_unnamed_look():
    plain, named = sample_dataset(1500, 3), sample_dataset(1500, 3, name_sizes=True)
    assert [_png_bytes(im) for im, _, _ in plain[:20]] == [_png_bytes(im) for im, _, _ in named[:20]]
    with_size = [(text, labels) for _, text, labels in named if labels["size"] in text.split()]
    for text, labels in with_size:
        assert text == caption(labels["shape"], labels["colour"], labels["size"])
    assert 0.4 < len(with_size) / len(named) < 0.6
    look = [(text, labels) for _, text, labels in named
            if (labels["shape"], labels["colour"], labels["size"]) == UNNAMED_LOOK]
    assert look and all(text == "a green diamond" for text, _ in look)
    # the look's parts are each named elsewhere, so the base learns what "big" means
    assert any(text == "a small green diamond" for text, _ in with_size)
    assert any(text == "a big red diamond" for text, _ in with_size)


def test_base_samples_never_hold_held_out_shapes():
    shapes = {labels["shape"] for _, _, labels in sample_dataset(600, 2)}
    assert shapes == set(BASE_SHAPES)
    assert not shapes & set(HELD_OUT_SHAPES)


def test_tokenizer_makes_each_vocabulary_word_one_token():
    tokenizer = build_shapes_tokenizer()
    assert tokenizer.model_max_length == 16
    for word in WORDS:
        tokens = tokenizer.tokenize(word)
        assert tokens == [word + "</w>"], (word, tokens)
    assert len(tokenizer("a purple triangle").input_ids) == 5  # start, three words, end
    assert tokenizer.tokenize("sks") == ["s", "k", "s</w>"]  # unknown words fall back to characters
    assert tokenizer.add_tokens(["<sks>"]) == 1
    assert tokenizer.tokenize("a <sks> star") == ["a</w>", "<sks>", "star</w>"]


def test_concept_examples_are_deterministic_and_shipped(tmp_path: Path):
    for name, concept in CONCEPTS.items():
        written = concept.write_examples(tmp_path / name)
        shipped = SHAPES_DATA / "concepts" / name
        assert sorted(p.name for p in shipped.iterdir()) == sorted(p.name for p in (tmp_path / name).iterdir())
        for path in written:
            assert path.read_bytes() == (shipped / path.name).read_bytes()
            caption_file = path.with_suffix(".txt")
            assert caption_file.read_text() == (shipped / caption_file.name).read_text()
    # the transformer base's LoRA recipe: each star also captioned with the bare prompt
    bare_too = SHAPES_DATA / "concepts" / "new_object_bare_too"
    written = NEW_OBJECT.write_examples(tmp_path / "bare_too", bare_copies=True)
    assert sorted(p.name for p in bare_too.iterdir()) == sorted(p.name for p in (tmp_path / "bare_too").iterdir())
    assert all(p.read_bytes() == (bare_too / p.name).read_bytes() for p in (tmp_path / "bare_too").iterdir())
    assert sorted((bare_too / f"{p.stem}.txt").read_text() for p in written).count("a sks\n") == 6
    assert {c for _, c in NEW_OBJECT.draw_examples()} == {f"a {colour} sks" for colour in
                                                          ("red", "green", "blue", "yellow", "purple", "orange")}
    assert NEW_OBJECT.composed_prompts("<sks>")[0][0] == "a red <sks>"
    assert {c for _, c in KNOWN_LOOK.draw_examples()} == {f"a {KNOWN_LOOK.token}"}


@pytest.fixture(scope="module")
def base_pipe():
    import torch
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(SHAPES_DATA / "base", dtype=torch.float32)


@pytest.fixture(scope="module")
def evaluator():
    from finetune.shapes.evaluator import Evaluator

    return Evaluator.load()  # the default path: the shipped file


def test_shipped_base_matches_its_checksums_and_loads(base_pipe):
    assert mismatches(SHAPES_DATA / "base", SHAPES_DATA / "base.sha256") == []
    assert type(base_pipe.scheduler).__name__ == "DDIMScheduler"
    for word in WORDS:
        assert len(base_pipe.tokenizer.tokenize(word)) == 1


@pytest.fixture
def one_thread():
    # tiny batches gain nothing from a second thread, and OpenMP threads that spin-wait for a core the other
    # tests' processes hold make this test ten times slower on a busy 2-core machine
    import torch

    kept = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(kept)


def test_metric_sampling_does_not_depend_on_batching(base_pipe, monkeypatch, one_thread):
    import numpy as np

    from finetune.shapes import metrics

    prompts = ["a red circle", "a blue square"]
    together = metrics.sample(base_pipe, prompts, images_per_prompt=2, seed=5)
    monkeypatch.setattr(metrics, "BATCH_IMAGES", 2)
    one_prompt_per_call = metrics.sample(base_pipe, prompts, images_per_prompt=2, seed=5)
    assert len(together) == 4 and together[0].size == (32, 32)
    for a, b in zip(together, one_prompt_per_call):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 2
    assert [p for p, _ in KNOWN_LOOK.composed_prompts()][0] == "a red ohwx"  # recolourings of the look


def test_a_prompt_with_more_images_than_a_batch_is_split_and_keeps_its_noise(base_pipe, monkeypatch, one_thread):
    import numpy as np

    from finetune.shapes import metrics

    whole = metrics.sample(base_pipe, ["a red circle", "a blue square"], images_per_prompt=3, seed=5)
    monkeypatch.setattr(metrics, "BATCH_IMAGES", 2)  # 3 images per prompt: calls of 2 and 1 for each prompt
    assert metrics._calls(["a", "b"], 3) == [(["a"], 2), (["a"], 1), (["b"], 2), (["b"], 1)]
    split = metrics.sample(base_pipe, ["a red circle", "a blue square"], images_per_prompt=3, seed=5)
    assert len(split) == 6
    for a, b in zip(whole, split):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 2


@pytest.mark.parametrize("concept", list(CONCEPTS.values()), ids=list(CONCEPTS))
def test_every_figure_rests_on_enough_samples_that_one_moves_it_by_at_most_half_a_point(concept, monkeypatch):
    from PIL import Image

    from finetune.shapes import metrics

    counted = {}

    def fake_sample(pipe, prompts, images_per_prompt, seed=0):
        counted[seed] = len(prompts) * images_per_prompt
        return [Image.new("RGB", (32, 32), "white")] * counted[seed]

    class AnyVerdict:
        def classify(self, images):
            return [{"shape": "circle", "colour": "red", "size": "big"}] * len(images)

    monkeypatch.setattr(metrics, "sample", fake_sample)
    metrics.report(None, AnyVerdict(), concept)
    points_per_sample = {seed: 100.0 / count for seed, count in counted.items()}
    assert set(points_per_sample) == {metrics.BASE_SEED, metrics.CONCEPT_SEED, metrics.COMPOSED_SEED}
    assert max(points_per_sample.values()) <= 0.5, points_per_sample


def test_held_out_images_are_the_concepts_own_distribution_and_never_its_training_images(evaluator, tmp_path):
    from finetune.shapes.concepts import matches

    for concept in CONCEPTS.values():
        examples, held_out = concept.draw_examples(), concept.draw_held_out()
        # the same captions and looks as the examples, each drawn again (deterministically) at another radius/place
        assert [c for _, c in held_out] == [c for _, c in examples]
        assert [_png_bytes(i) for i, _ in concept.draw_held_out()] == [_png_bytes(i) for i, _ in held_out]
        trained = {_png_bytes(i) for i, _ in examples}
        assert not trained & {_png_bytes(i) for i, _ in held_out}
        labels = [{"shape": s, "colour": c, "size": z} for s, c, z, _ in concept.examples]
        assert all(matches(verdict, label) for verdict, label in zip(evaluator.classify([i for i, _ in held_out]),
                                                                      labels))
        folder = concept.write_held_out(tmp_path / concept.name)
        assert sorted(p.name for p in folder.glob("*.txt")) == [f"{i}.txt" for i in range(len(examples))]
        assert (folder / "0.txt").read_text() == examples[0][1] + "\n"


def test_shipped_evaluator_recognises_fresh_ground_truth(evaluator):
    from finetune.shapes.evaluator import ground_truth_accuracy

    shipped = SHAPES_DATA / "evaluator.safetensors"
    assert (SHAPES_DATA / "evaluator.sha256").read_text().split()[0] == sha256_of(shipped)
    accuracy = ground_truth_accuracy(evaluator, n=480, seed=20_240_611, shapes=ALL_SHAPES)
    assert accuracy["shape"] >= 0.95 and accuracy["colour"] >= 0.95 and accuracy["size"] >= 0.95, accuracy


def test_shipped_transformer_base_is_a_small_sd3_that_loads_as_users_load_it():
    import json

    import torch
    from diffusers import StableDiffusion3Pipeline

    from finetune.models import detect
    from finetune.shapes.metrics import judging_scheduler

    folder = SHAPES_DATA / "transformer_base"
    assert mismatches(folder, SHAPES_DATA / "transformer_base.sha256") == []
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) <= 20e6  # the limit
    # saved without T5: diffusers loads it when told so, as the model card says; finetune reads model_index.json
    assert json.loads((folder / "model_index.json").read_text())["text_encoder_3"] == [None, None]
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None,
                                                    dtype=torch.float32)
    assert detect.family_of(str(folder)) == "sd3"
    assert type(pipe.transformer).__name__ == "SD3Transformer2DModel" and pipe.transformer.config.qk_norm == "rms_norm"
    for word in WORDS:
        assert len(pipe.tokenizer.tokenize(word)) == 1 and len(pipe.tokenizer_2.tokenize(word)) == 1
    # judged with its own flow-matching sampler (DDIM cannot integrate a velocity), the U-Net base with DDIM
    assert type(judging_scheduler(pipe.scheduler)).__name__ == "FlowMatchEulerDiscreteScheduler"
    from diffusers import DDPMScheduler

    assert type(judging_scheduler(DDPMScheduler())).__name__ == "DDIMScheduler"


def test_parts_stored_as_none_are_what_model_index_lists_as_null(tmp_path):
    import json

    from finetune.models.pipeline_folder import parts_stored_as_none

    (tmp_path / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusion3Pipeline", "text_encoder_3": [None, None], "tokenizer_3": [None, None],
         "vae": ["diffusers", "AutoencoderKL"]}))
    assert parts_stored_as_none(str(tmp_path)) == {"text_encoder_3": None, "tokenizer_3": None}
    assert parts_stored_as_none("stabilityai/stable-diffusion-3.5-medium") == {}
    assert parts_stored_as_none(None) == {}


def test_transformer_base_script_builds_the_shipped_architecture(tmp_path):
    import json
    import subprocess
    import sys

    # two steps on 64 images: the architecture, tokenizers, scheduler and latent normalisation the full run ships
    script = SHAPES_DATA / "train_transformer_base.py"
    out = tmp_path / "transformer_base"
    result = subprocess.run([sys.executable, str(script), "--out", str(out), "--steps", "2", "--every", "2",
                             "--images", "64"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    shipped = SHAPES_DATA / "transformer_base"
    for part in ("transformer", "text_encoder", "text_encoder_2", "scheduler"):
        name = "scheduler_config.json" if part == "scheduler" else "config.json"
        made, kept = (json.loads((folder / part / name).read_text()) for folder in (out, shipped))
        for config in (made, kept):
            config.pop("_diffusers_version", None), config.pop("transformers_version", None)
        assert made == kept, part
    assert (out / "model_index.json").read_text() == (shipped / "model_index.json").read_text()
    for name in ("tokenizer/tokenizer.json", "tokenizer_2/tokenizer.json"):
        # the vocabulary and merges (the file also keeps the truncation of its last call, which differs)
        made, kept = (json.loads((folder / name).read_text()) for folder in (out, shipped))
        assert (made["model"], made["added_tokens"]) == (kept["model"], kept["added_tokens"]), name
    # the autoencoder's weights are the U-Net base's; its SD3 shift and scale come from 64 images here
    vae = json.loads((out / "vae" / "config.json").read_text())
    assert abs(vae["shift_factor"] - json.loads((shipped / "vae" / "config.json").read_text())["shift_factor"]) < 0.1
    from safetensors.torch import load_file

    made, unet_base = (load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
                       for folder in (out, SHAPES_DATA / "base"))
    assert made.keys() == unet_base.keys() and all((made[k] == unet_base[k]).all() for k in made)
    assert mismatches(out, tmp_path / "transformer_base.sha256") == []


def test_shipped_bases_by_name():
    from finetune.shapes.paths import base_path

    assert base_path(None) == base_path("unet") == SHAPES_DATA / "base"
    assert base_path("transformer") == SHAPES_DATA / "transformer_base"
    assert base_path("/some/folder") == Path("/some/folder")  # any other folder as given
