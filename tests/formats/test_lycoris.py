"""LoHa and LoKr in the LyCORIS layout AUTOMATIC1111 and ComfyUI read (issue 19, item 5).

Those programs are not installed here, so their rules are written out below from their source (AUTOMATIC1111
extensions-builtin/Lora: networks.py, network_hada.py, network_lokr.py, NetworkModule.calc_scale; ComfyUI
comfy/lora.py, comfy/weight_adapter/loha.py and lokr.py): which key suffixes a module may carry, how its change
is computed, and its strength. Every key we write must obey them, and every module's change by their formula must
equal what peft trained (get_delta_weight). A kohya-style name that matches no module would be dropped with at
most a log line; each is checked to name a real module."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import finetune
from finetune.cli import main
from finetune.export.lora.diffusers import unpack as by_stem  # `stem.role` keys split at the first dot
from finetune.recipe.load import parse_recipe
from finetune.training.loop import train
from tests.helpers import applied_changes, images, kohya_stem, pipeline, recipe_dict

# what each reader requires of a module (AUTOMATIC1111 asserts on an incomplete set; ComfyUI skips the module)
SUFFIXES = {"loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
            "lokr": {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"}}


def reader_change(found: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """A module's weight change as AUTOMATIC1111 and ComfyUI compute it from the file's tensors."""
    alpha = float(found["alpha"]) if "alpha" in found else None
    if "hada_w1_a" in found:  # LoHa: (w1_a @ w1_b) * (w2_a @ w2_b), strength alpha / w1_b's rows
        rank = found["hada_w1_b"].shape[0]
        change = (found["hada_w1_a"] @ found["hada_w1_b"]) * (found["hada_w2_a"] @ found["hada_w2_b"])
        return (change * (alpha / rank if alpha is not None else 1.0)).reshape(shape)
    # LoKr: kron(w1, w2); strength alpha / (w2_b's rows), or 1 when both factors are whole
    w1 = found["lokr_w1"]
    if "lokr_w2_b" in found:
        w2, dim = found["lokr_w2_a"] @ found["lokr_w2_b"], found["lokr_w2_b"].shape[0]
    else:
        w2, dim = found["lokr_w2"], None
    scale = alpha / dim if (alpha is not None and dim is not None) else 1.0
    return (torch.kron(w1.reshape(w1.shape[0], -1), w2.reshape(w2.shape[0], -1)) * scale).reshape(shape)


CASES = {"loha": {"variant": "loha", "rank": 4, "alpha": 2},
         # rank 2: LoKr factorises lokr_w2 on the tiny base's layers; rank 8: both factors whole (strength 1 there)
         "lokr_factorised": {"variant": "lokr", "rank": 2, "alpha": 1},
         "lokr_whole": {"variant": "lokr", "rank": 8, "alpha": 2}}


@pytest.fixture(scope="module", params=list(CASES))
def trained(request, tiny_base, concept_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "out"
    strategy = {"kind": "lora", **CASES[request.param], "conv_layers": True, "text_encoder": True,
                "formats": ["diffusers", "kohya"]}
    peft_file = train(parse_recipe(recipe_dict(tiny_base, concept_dir, out, strategy=strategy,
                                               train={"max_steps": 3, "learning_rate": 1e-2})))
    return {"case": request.param, "peft": peft_file, "lycoris": out / "kohya" / "out.safetensors"}


def test_every_key_is_one_the_readers_apply(trained, tiny_base):
    variant = CASES[trained["case"]]["variant"]
    modules = by_stem(load_file(trained["lycoris"]))
    pipe = pipeline(tiny_base)
    real = {kohya_stem(c, m) for c in ("unet", "text_encoder") for m, _ in getattr(pipe, c).named_modules()}
    for stem, found in modules.items():
        assert stem in real, stem  # a name no module has would be skipped
        assert set(found) <= SUFFIXES[variant] and "alpha" in found and found["alpha"].dim() == 0, (stem, set(found))
    if variant == "lokr":
        whole = [s for s, f in modules.items() if "lokr_w2_b" not in f]
        assert bool(whole) == (trained["case"] == "lokr_whole")
    assert any(s.startswith("lora_te_text_model_encoder_layers_") for s in modules)  # the text encoder too
    assert any("_resnets_" in s and s.endswith("_conv1") for s in modules)  # and 3x3 convolutions


def test_the_readers_formulas_give_what_peft_trained(trained, tiny_base):
    pipe = pipeline(tiny_base)
    name = finetune.load_adapter(pipe, trained["peft"])
    trained_changes = applied_changes(pipe, name)
    modules = by_stem(load_file(trained["lycoris"]))
    assert set(modules) == set(trained_changes)
    for stem, change in trained_changes.items():
        torch.testing.assert_close(reader_change(modules[stem], change.shape), change, atol=1e-6, rtol=1e-4,
                                   msg=stem)


def test_the_peft_adapter_file_needs_no_header_to_apply_at_its_trained_strength(trained):
    """Its `<component>.<module>.hada_*` / `lokr_*` keys are what ComfyUI and Forge apply for Flux and SD3
    (`transformer.` names), at strength 1 without a `.alpha` tensor: the file's own factors must give the change
    the LyCORIS file (written from the training state, alpha kept) gives."""
    from finetune.export.lora.kohya import kohya_module

    lycoris = by_stem(load_file(trained["lycoris"]))
    peft = load_file(trained["peft"])
    modules = {}
    for key, value in peft.items():
        module, _, role = key.rpartition(".")
        modules.setdefault(module, {})[role] = value
    assert not any("alpha" in found for found in modules.values())
    for module, found in modules.items():
        component, _, path = module.partition(".")
        stem = kohya_module(component, path)
        expected = reader_change(lycoris[stem], torch.Size([-1]))
        torch.testing.assert_close(reader_change(found, torch.Size([-1])), expected, atol=1e-6, rtol=1e-4,
                                   msg=module)


def test_the_lycoris_file_loads_back_and_converts_both_ways(trained, tiny_base, tmp_path):
    reference = pipeline(tiny_base)
    finetune.load_adapter(reference, trained["peft"])
    expected = images(reference)
    pipe = pipeline(tiny_base)
    name = finetune.load_adapter(pipe, trained["lycoris"])
    np.testing.assert_allclose(images(pipe), expected, atol=1e-5)
    assert finetune.unload_adapter(pipe, name) == [name]

    back = tmp_path / "peft.safetensors"
    assert main(["convert", str(trained["lycoris"]), str(back), "--to", "diffusers"]) == 0
    again = tmp_path / "lycoris.safetensors"
    assert main(["convert", str(back), str(again), "--to", "kohya"]) == 0
    pipe = pipeline(tiny_base)
    finetune.load_adapter(pipe, back)
    np.testing.assert_allclose(images(pipe), expected, atol=1e-5)
    # the peft-adapter file folds alpha / r into the first factor (alpha = r), so the same change comes back,
    # by the readers' formula, not the same alphas
    original, converted = by_stem(load_file(trained["lycoris"])), by_stem(load_file(again))
    assert original.keys() == converted.keys()
    for stem, found in original.items():
        assert found.keys() == converted[stem].keys(), stem
        torch.testing.assert_close(reader_change(converted[stem], torch.Size([-1])),
                                   reader_change(found, torch.Size([-1])), atol=1e-6, rtol=1e-5, msg=stem)
