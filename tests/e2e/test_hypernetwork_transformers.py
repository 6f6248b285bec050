"""Hypernetworks on a transformer's text stream (SD3, Flux.1, Z-Image): they train through the shared loop, the file
loads with `finetune.load_adapter` onto a fresh pipeline and reproduces the trained images, strength 0 is the base
exactly, the MLPs rewrite the text stream's key/value inputs and nothing else, and what cannot work is refused by
name (a file for no layer of the model, for another kind of model, A1111's .pt, self_attention)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from finetune import load_adapter, unload_adapter
from finetune.export import hypernetwork as files
from finetune.models import family_for
from finetune.models import spec_of
from finetune.models.tiny import save_tiny_pipeline
from finetune.networks.hypernetwork import Hypernetwork, Structure, loaded
from finetune.networks.hypernetwork_points import TextStream, attention_layers
from finetune.recipe.load import RecipeError, parse_recipe
from tests.helpers import fixed_loss, images_of, recipe_dict, saved_pipeline, train_keeping_parts

PROMPT = "a purple sks"
HN = {"kind": "hypernetwork", "layer_structure": [1, 2, 1]}
TRAIN = {"max_steps": 12, "learning_rate": 1e-2, "batch_size": 4, "seed": 0}
# written out here, not read from the families: the projections whose input must be rewritten (the text
# stream's keys and values); every other key/value projection must see its attention layer's own input
REWRITTEN = {
    "sd3": {f"transformer_blocks.{i}.attn.{p}" for i in (0, 1) for p in ("add_k_proj", "add_v_proj")},
    "flux": {"transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.attn.add_v_proj"},
    "zimage": {"context_refiner.0.attention.to_k", "context_refiner.0.attention.to_v"},
}
DENOISERS = {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel", "zimage": "ZImageTransformer2DModel"}


@pytest.fixture(scope="module", params=sorted(REWRITTEN))
def run(request, concept_dir, tmp_path_factory):
    """One short hypernetwork run per family: the base, the artifact, the trained parts, losses and images."""
    name = request.param
    base = save_tiny_pipeline(tmp_path_factory.mktemp(name) / "base", family=name)
    family = family_for(name)
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 127.5 - 1)
                          .permute(2, 0, 1) for p in sorted(concept_dir.glob("*.png"))])
    loss_before = fixed_loss(family, family.load(str(base)), pixels, [PROMPT] * len(pixels))
    out = tmp_path_factory.mktemp(f"hn-{name}") / "out"
    artifact, parts = train_keeping_parts(parse_recipe(recipe_dict(base, concept_dir, out, strategy=HN,
                                                                   train=TRAIN)))
    trained = family.pipeline(parts)
    trained.set_progress_bar_config(disable=True)
    return {"name": name, "base": base, "artifact": artifact, "family": family, "loss_before": loss_before,
            "loss_after": fixed_loss(family, parts, pixels, [PROMPT] * len(pixels)),
            "trained_images": images_of(trained), "base_images": images_of(saved_pipeline(base))}


def test_it_trains_and_the_file_records_the_text_stream(run):
    assert run["loss_after"] < run["loss_before"], (run["loss_before"], run["loss_after"])
    assert np.abs(run["trained_images"] - run["base_images"]).max() > 1e-3  # the outputs moved
    assert run["artifact"].name == files.FILE_NAME
    stream = files.read(run["artifact"]).structure.text_stream
    assert stream is not None and stream.model == DENOISERS[run["name"]]
    assert not (run["artifact"].parent / "a1111").exists()


def test_the_file_loads_onto_a_fresh_pipeline_and_reproduces_the_trained_images(run):
    pipe = saved_pipeline(run["base"])
    name = load_adapter(pipe, run["artifact"])  # no arguments: the file says where it goes
    np.testing.assert_allclose(images_of(pipe), run["trained_images"], atol=1e-5, rtol=0)
    unload_adapter(pipe, name)
    assert np.array_equal(images_of(pipe), run["base_images"])


def test_strength_zero_is_the_base_exactly(run):
    pipe = saved_pipeline(run["base"])
    name = load_adapter(pipe, run["artifact"], scale=0.0)
    assert np.array_equal(images_of(pipe), run["base_images"])
    loaded(pipe.transformer)[name].set_strength(1.0)  # the same network at full strength: the trained images
    np.testing.assert_allclose(images_of(pipe), run["trained_images"], atol=1e-5, rtol=0)


def _inputs(module_args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An attention layer's (hidden_states, encoder_hidden_states), however its block passes them."""
    hidden = kwargs.get("hidden_states", module_args[0] if module_args else None)
    context = kwargs.get("encoder_hidden_states", module_args[1] if len(module_args) > 1 else None)
    return hidden, context


def test_only_the_text_streams_key_value_inputs_are_rewritten(run):
    """Every call of every key/value projection during sampling: the text stream's see H(its attention layer's
    text input), rewritten; every other (the image stream's, Flux's single blocks', Z-Image's noise refiner and
    main layers') sees its attention layer's own input untouched."""
    pipe = saved_pipeline(run["base"])
    name = load_adapter(pipe, run["artifact"])
    network = loaded(pipe.transformer)[name]
    transformer = pipe.transformer
    seen: list[tuple[str, torch.Tensor, torch.Tensor, bool]] = []  # (projection, its input, expected, raw?)
    layer_inputs: dict[str, tuple] = {}
    hooks = []
    for layer_name, attn in attention_layers(transformer):
        hooks.append(attn.register_forward_pre_hook(
            lambda m, a, kw, n=layer_name: layer_inputs.__setitem__(n, _inputs(a, kw)), with_kwargs=True))
        for projection in ("to_k", "to_v", "add_k_proj", "add_v_proj"):
            if getattr(attn, projection, None) is None:
                continue
            full = f"{layer_name}.{projection}"

            def record(module, args, full=full, layer_name=layer_name, projection=projection):
                hidden, context = layer_inputs[layer_name]
                raw = context if projection.startswith("add_") else hidden
                expected = raw
                if full in REWRITTEN[run["name"]]:
                    expected = network.pair(raw.shape[-1])[0 if projection in ("to_k", "add_k_proj") else 1](raw)
                seen.append((full, args[0].detach().clone(), expected.detach().clone(), torch.equal(args[0], raw)))
            hooks.append(getattr(attn, projection).register_forward_pre_hook(record))
    try:
        images_of(pipe)
    finally:
        for hook in hooks:
            hook.remove()
    names = {full for full, *_ in seen}
    assert REWRITTEN[run["name"]] <= names and len(names) > len(REWRITTEN[run["name"]])  # image stream seen too
    for full, given, expected, untouched in seen:
        assert untouched == (full not in REWRITTEN[run["name"]]), full
        torch.testing.assert_close(given, expected, rtol=0, atol=1e-6, msg=full)


def test_a_file_for_no_layer_of_the_model_is_refused_by_name(run, tmp_path):
    stream = files.read(run["artifact"]).structure.text_stream
    pipe = saved_pipeline(run["base"])
    other_width = Hypernetwork(Structure(widths=(768,), text_stream=stream))
    path = files.save(tmp_path, other_width, {})
    with pytest.raises(ValueError, match=rf"widths \[768\] match no attention layer of {DENOISERS[run['name']]}'s "
                                         r"text stream .*made for another base"):
        load_adapter(pipe, path)
    nowhere = Hypernetwork(Structure(widths=files.read(run["artifact"]).structure.widths,
                                     text_stream=TextStream("no_such_blocks.", stream.keys, stream.values,
                                                            stream.model)))
    with pytest.raises(ValueError, match=r"no attention layer of .*no_such_blocks\.\*.*this model has no such layer"):
        load_adapter(pipe, files.save(tmp_path / "nowhere", nowhere, {}))
    assert not loaded(pipe.transformer)  # nothing stays attached after a refusal
    assert np.array_equal(images_of(pipe), run["base_images"])


def test_a_file_onto_another_kind_of_model_is_refused_by_name(run):
    other = min(n for n in REWRITTEN if n != run["name"])
    for family, denoiser in ((other, DENOISERS[other]), ("sd", "UNet2DConditionModel")):
        with pytest.raises(ValueError, match=rf"rewrites {DENOISERS[run['name']]}'s text stream .*this pipeline's "
                                             rf"denoiser is a {denoiser}"):
            load_adapter(spec_of(family).tiny(0), run["artifact"])


def test_a_unet_hypernetwork_is_refused_on_a_transformer(run, tmp_path):
    unet_file = files.save(tmp_path, Hypernetwork(Structure(widths=(32,))), {})  # cross-attention, A1111's design
    with pytest.raises(ValueError, match=rf"U-Net's cross-attention.*this {DENOISERS[run['name']]} has no "
                                         "cross-attention"):
        load_adapter(saved_pipeline(run["base"]), unet_file)


@pytest.mark.parametrize("option, message", [
    ({"a1111_pt": True}, r"strategy.a1111_pt: AUTOMATIC1111's .* U-Net's cross-attention only.*remove a1111_pt"),
    ({"self_attention": True}, r"strategy.self_attention: on \w+ the network rewrites only the text stream"),
])
def test_unet_only_options_are_refused(run, concept_dir, tmp_path, option, message):
    from finetune.strategies import create_strategy
    from finetune.strategies.base import StrategySetupError
    from finetune.strategies.hypernetwork import Options

    with pytest.raises(RecipeError, match=message):  # validate, told from the base's model_index.json
        parse_recipe(recipe_dict(run["base"], concept_dir, tmp_path / "o", strategy={**HN, **option}))
    strategy = create_strategy(Options(kind="hypernetwork", **option))
    with pytest.raises(StrategySetupError, match=message):  # and check, for a base told only by loading it
        strategy.check(run["family"], run["family"].load(str(run["base"])))
    with pytest.raises(ValueError, match="applies to a U-Net's cross-attention only"):  # no .pt writer either
        files.to_a1111(files.read(run["artifact"]), name="x", weight_init="normal", step=0, base_model="")


def test_a_header_without_a_text_stream_is_a_unet_network():
    """Files written before transformers had hypernetworks carry no `text_stream`: cross-attention, as then."""
    old = ('{"activate_output": false, "activation": "linear", "dropout_structure": [0.0, 0.0, 0.0], '
           '"layer_norm": false, "layer_structure": [1.0, 2.0, 1.0], "self_attention": false, "widths": [32]}')
    structure = files.structure_from_header(old)
    assert structure.text_stream is None and structure.widths == (32,)
    stream = TextStream("transformer_blocks.", "add_k_proj", "add_v_proj", "SD3Transformer2DModel")
    assert files.structure_from_header(files.structure_header(Structure(widths=(16,), text_stream=stream))) == \
        Structure(widths=(16,), text_stream=stream)
