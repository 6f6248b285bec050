"""What every strategy promises on every model family, checked the same way for each (adding a strategy to
CONTRACT (tests/helpers.py), or a family to finetune.models.FAMILY_MODULES, covers it):
- right after `prepare` the model computes exactly what the base does;
- training changes only the parameters the strategy hands the optimizer (and never the VAE);
- the loss on fixed data falls;
- its saved artifact, loaded onto a fresh base (or loaded whole, DreamBooth), computes what the trained model does.
"""
from __future__ import annotations

import json
import os
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune.data.dataset import uncropped_conditions
from finetune.models import family_for, specs
from finetune.models.base import guidance_keyword
from finetune.models.pipeline_folder import latent_channels_of
from finetune.recipe.load import parse_recipe
from finetune.report.history import read_history
from finetune.shapes.evaluate import tuned_pipeline
from finetune.strategies import KINDS
from finetune.training import loop
from finetune.training.sampling import size_arguments
from tests.helpers import CONTRACT, NOT_YET, allowed_by, fixed_loss, recipe_dict, reset_accelerate


# the first losses of every (strategy, family) pair, recorded under the pinned versions (constraints.txt);
# FINETUNE_WRITE_GOLDEN=1 records a pair's anew (after a deliberate change to the maths, or new pinned versions)
GOLDEN = Path(__file__).with_name("golden_losses.json")
PINNED = ("torch", "diffusers", "transformers", "peft")


def compare_golden_losses(pair: str, losses: dict) -> None:
    """`losses` (lists or floats) against the recorded ones within rtol 1e-4: far above the float noise of one CPU
    build, far below any change to an objective, a step or an optimizer. Skips, naming them, where the installed
    versions of PINNED are not those the values were recorded under."""
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {"versions": {}, "losses": {}}
    here = {name: version(name) for name in PINNED}
    if os.environ.get("FINETUNE_WRITE_GOLDEN") == "1":
        golden["versions"], golden["losses"][pair] = here, losses
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        return
    if golden["versions"] != here:
        pytest.skip(f"golden losses were recorded under {golden['versions']}, these are {here}")
    assert pair in golden["losses"], f"no golden losses for {pair}: run it with FINETUNE_WRITE_GOLDEN=1"
    for key, value in golden["losses"][pair].items():
        np.testing.assert_allclose(losses[key], value, rtol=1e-4, err_msg=f"{pair} {key}")


# a strategy's option a family refuses (spec.refuses "kind.option"): the contract runs train without it
REFUSED_OPTIONS = sorted((key, spec.name) for spec in specs().values() for key in spec.refuses if "." in key)


def test_every_strategy_is_under_contract():
    assert set(CONTRACT) == set(KINDS)


@pytest.mark.parametrize("kind, family_name", sorted(NOT_YET))
def test_a_pair_not_written_yet_is_refused_by_name(kind, family_name, tiny_bases):
    """validate refuses it from the family's spec, before any model loads."""
    from finetune.recipe.load import RecipeError

    with pytest.raises(RecipeError, match=NOT_YET[(kind, family_name)]):
        parse_recipe(recipe_dict(tiny_bases[family_name], ".", "out", strategy=CONTRACT[kind].options))


@pytest.mark.parametrize("key, family_name", REFUSED_OPTIONS or [pytest.param(None, None, marks=pytest.mark.skip(
    reason="no family refuses a strategy option"))])
def test_a_refused_option_is_refused_by_name(key, family_name, tiny_bases):
    from finetune.recipe.load import RecipeError

    kind, _, option = key.partition(".")
    with pytest.raises(RecipeError, match=rf"strategy\.{option}: .* on {family_name} with {option} is not written"):
        parse_recipe(recipe_dict(tiny_bases[family_name], ".", "out",
                                 strategy={**CONTRACT[kind].options, option: True}))


def _outputs(family, parts, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The text encoding of `prompt` and the denoiser's prediction for fixed latents and timesteps."""
    generator = torch.Generator().manual_seed(0)
    # the VAE's channels: what predict takes (Flux's transformer reads 2x2 patches, 4x as many channels)
    latents = torch.randn(1, latent_channels_of(parts.vae.config), 8, 8, generator=generator)
    with torch.no_grad():
        conditioning = family.encode_prompts(parts, [prompt])
        return conditioning, family.predict(parts, latents, torch.tensor([500]), conditioning,
                                                 uncropped_conditions(1, 32, 32))


@pytest.fixture(scope="module", params=[(kind, family) for family in specs() for kind in CONTRACT
                                        if (kind, family) not in NOT_YET],
                ids=lambda param: f"{param[0]}-{param[1]}")
def run(request, tiny_bases, concept_dir, tmp_path_factory):
    """One short run per strategy and family, keeping the base as loaded, the strategy, and the model as
    trained."""
    from PIL import Image

    kind, family_name = request.param
    tiny_base = tiny_bases[family_name]
    contract = CONTRACT[kind]
    options, prompt, learning_rate, base_prompt = (allowed_by(specs()[family_name], contract.options),
                                                   contract.prompt, contract.learning_rate,
                                                   contract.base_prompt)
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 127.5 - 1)
                          .permute(2, 0, 1) for p in sorted(concept_dir.glob("*.png"))])
    family = family_for(family_name)
    kept: dict = {"reference": family.load(str(tiny_base))}
    if kind == "textual_inversion" and len(family.text_encoders(kept["reference"])) < len(
            kept["reference"].text_encoder_names):
        # T5 reads the placeholder's letters, not the initializer word: the placeholder cannot compute like the
        # initializer (tests/e2e/test_textual_inversion_t5.py checks the CLIP side); a prompt without it must not move
        base_prompt = prepared_prompt = "a purple x"
    else:
        prepared_prompt = prompt

    out = tmp_path_factory.mktemp(f"{kind}-{family_name}") / "out"
    recipe = parse_recipe(recipe_dict(tiny_base, concept_dir, out, strategy=options,
                                      train={"max_steps": 12, "learning_rate": learning_rate, "batch_size": 4}))
    try:
        with loop.setup(recipe, family=family) as trained:  # the base loaded, the strategy prepared, not a step yet
            # the reference: the base as the run loads it (the recipe's defaults: fp32, nothing quantized)
            kept["prepared"] = (_outputs(family, kept["reference"], base_prompt),
                                _outputs(family, trained.parts, prepared_prompt))
            kept["loss_before"] = fixed_loss(family, trained.parts, pixels, [prompt] * len(pixels))
            loop.run_steps(trained)
            kept["artifact"] = loop.finish(trained)
        kept["losses"] = [record["loss"] for record in read_history(out)]
        kept.update(parts=trained.parts, strategy=trained.strategy)
    finally:
        reset_accelerate()
    for module in kept["parts"].modules.values():
        module.eval()
    kept["loss_after"] = fixed_loss(family, kept["parts"], pixels, [prompt] * len(pixels))
    kept.update(family=family, prompt=prompt, learning_rate=learning_rate, base=tiny_base, name=kind)
    return kept


def test_prepare_changes_nothing_the_model_computes(run):
    (encoding, prediction), (encoding_after, prediction_after) = run["prepared"]
    torch.testing.assert_close(encoding_after, encoding, atol=1e-6, rtol=0)
    torch.testing.assert_close(prediction_after, prediction, atol=1e-6, rtol=0)


def test_only_what_the_strategy_trains_changes(run):
    allowed = CONTRACT[run["name"]].base_weights
    given = {id(p) for group in run["strategy"].parameter_groups(run["learning_rate"]) for p in group["params"]}
    assert set(run["parts"].modules) == set(run["reference"].modules)
    for component, module in run["reference"].modules.items():
        reference = dict(module.named_parameters())
        trained = run["parts"].modules[component]
        # peft keeps an adapted layer's own weight as `<layer>.base_layer.weight`: compared under its plain name
        changed = [name for name, p in trained.named_parameters()
                   if name.replace(".base_layer", "") in reference
                   and not torch.equal(p.detach().cpu().float(),
                                       reference[name.replace(".base_layer", "")].detach().float())]
        compared = [n for n, _ in trained.named_parameters() if n.replace(".base_layer", "") in reference]
        assert len(compared) == len(reference), (component, "a base weight went uncompared")
        unintended = [name for name in changed if id(dict(trained.named_parameters())[name]) not in given
                      or not f"{component}.{name}".startswith(allowed or ("<none>",))]
        assert unintended == [], (component, unintended[:5])


def test_the_loss_falls(run):
    """On fixed data, noise and timesteps: right after prepare (the base) and after 12 steps."""
    assert run["loss_after"] < run["loss_before"], (run["name"], run["loss_before"], run["loss_after"])


def test_the_losses_are_the_golden_ones(run):
    """The first training losses and the fixed-data loss after training, against the values stored for this
    (strategy, family) pair under the pinned versions (tests/contracts/golden_losses.json): a change to the maths
    fails here even when it is deterministic, which comparing two runs with each other cannot see."""
    compare_golden_losses(f"{run['name']}-{run['family'].name}",
                          {"steps": run["losses"][:4], "after_training": run["loss_after"]})


def test_the_saved_artifact_reproduces_the_trained_model(run):
    trained = run["family"].pipeline(run["parts"])
    loaded = tuned_pipeline(run["base"], run["artifact"])
    # the area a pipeline samples at where it is an attribute __init__ sets and save_pretrained does not keep
    # (HiDream rescales any size to (default_sample_size x 8)^2; a user of the tiny sets it as its builder does)
    if hasattr(loaded, "default_sample_size"):
        loaded.default_sample_size = trained.default_sample_size
    for pipe in (trained, loaded):
        pipe.set_progress_bar_config(disable=True)
    outputs = []
    for pipe in (trained, loaded):
        generator = torch.Generator().manual_seed(0)
        outputs.append(pipe(prompt=[run["prompt"]], num_inference_steps=2, **{guidance_keyword(pipe): 3.0},
                            height=32, width=32, generator=generator, output_type="np", **size_arguments(pipe, 32, 32)).images)
    np.testing.assert_allclose(outputs[1], outputs[0], atol=2e-3 if run["name"] == "dreambooth" else 1e-5)


def test_the_pipelines_own_loader_puts_back_every_trained_lora_layer(run):
    """LoRA's diffusers-layout file through the family pipeline's stock `load_lora_weights` (what diffusers users
    and ComfyUI's diffusers path do): every adapted module of the denoiser, and of each text encoder the loader
    reads, computes what the trained one computes, module by module (a layer the loader skipped changes nothing
    in its module, and fails here however small its share of an image)."""
    if run["name"] != "lora":
        pytest.skip("LoRA's file; the other strategies' artifacts are checked by the test above")
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(run["base"]))
    pipe.load_lora_weights(str(run["artifact"]))
    loadable = set(getattr(pipe, "_lora_loadable_modules", ())) & set(run["parts"].modules)
    checked = 0
    for component in sorted(loadable):
        trained = dict(run["parts"].modules[component].named_modules())
        loaded = dict(getattr(pipe, component).named_modules())
        for name, module in trained.items():
            base = getattr(module, "base_layer", None)
            if not hasattr(module, "lora_A") or not isinstance(base, torch.nn.Linear):
                continue
            x = torch.randn(2, base.in_features, generator=torch.Generator().manual_seed(checked))
            assert name in loaded and hasattr(loaded[name], "lora_A"), (component, name, "not loaded")
            with torch.no_grad():
                torch.testing.assert_close(loaded[name](x), module(x), rtol=1e-4, atol=1e-5,
                                           msg=f"{component}.{name}")
            checked += 1
    assert checked > 0 and run["parts"].denoiser_name in loadable
