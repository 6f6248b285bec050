"""`model.quantize`: a LoRA trains on a denoiser quantised weight-only to 8 bits (torchao) and loads into the
unquantised pipeline with nearly the same output; merging or extracting refuses quantised weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from finetune.models import family_for
from finetune.models.quantize import is_quantized, quantize_weights
from finetune.models.tiny import save_tiny_pipeline
from finetune.recipe.load import parse_recipe
from tests.helpers import draw_concept, images_of, recipe_dict, saved_pipeline, train_keeping_parts

pytest.importorskip("torchao")


@pytest.fixture(scope="module")
def sd3_base(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd3", family="sd3")


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_a_lora_trained_on_a_quantised_base_applies_to_the_full_precision_one(kind, sd3_base, tmp_path):
    recipe = recipe_dict(sd3_base, draw_concept(tmp_path / "images"), tmp_path / "out",
                         strategy={"kind": "lora", "rank": 4},
                         train={"max_steps": 8, "learning_rate": 1e-2, "batch_size": 2})
    recipe["model"]["quantize"] = kind
    artifact, parts = train_keeping_parts(parse_recipe(recipe))
    linear = {n: m for n, m in parts.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    base_layers = [m for n, m in linear.items() if ".lora_" not in n]
    adapters = [m for n, m in linear.items() if ".lora_" in n]
    assert base_layers and all(type(m.weight.data).__module__.startswith("torchao") for m in base_layers)  # 8 bits
    assert adapters and all(type(m.weight.data) is torch.Tensor for m in adapters)  # the LoRA in full precision
    trained = images_of(family_for("sd3").pipeline(parts))
    base = images_of(saved_pipeline(sd3_base))
    loaded = saved_pipeline(sd3_base)
    loaded.load_lora_weights(str(artifact))
    full = images_of(loaded)
    effect = np.abs(full - base).max()
    assert effect > 1e-3  # the LoRA changes the image
    # the full-precision base with the LoRA draws what the quantised one did, up to the quantisation's error
    # measured: int8 0.1% of the image, fp8 0.5%, against a LoRA effect of 14%
    assert np.abs(full - trained).mean() < 0.1 * np.abs(full - base).mean()


def test_merging_or_extracting_refuses_quantised_weights():
    from peft import LoraConfig

    from finetune.export.extract_lora import extract_component
    from finetune.networks import peft_layers

    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 32))
    plain = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 32))
    assert quantize_weights(model, "int8") == 2 and is_quantized(model) and not is_quantized(plain)
    peft_layers.inject(model, LoraConfig(r=2, target_modules=["0", "2"]))
    with pytest.raises(ValueError, match="merging an adapter needs full-precision weights"):
        peft_layers.fuse(model)
    with pytest.raises(ValueError, match="extracting a LoRA needs full-precision weights"):
        extract_component(model, plain, rank=2)


def test_validate_refuses_quantised_dreambooth(sd3_base, tmp_path, capsys):
    from finetune.cli import main

    recipe = recipe_dict(sd3_base, draw_concept(tmp_path / "images", count=1), tmp_path / "out",
                         strategy={"kind": "dreambooth"})
    recipe["model"]["quantize"] = "int8"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["validate", str(tmp_path / "r.yaml")]) == 2
    assert "DreamBooth trains those weights" in capsys.readouterr().err
