"""LoRA end to end on the tiny pipeline: trains, touches nothing else, and loads with diffusers' own loader."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

import finetune
from finetune.models.stable_diffusion import StableDiffusion
from finetune.recipe.load import parse_recipe
from finetune.training import loop
from tests.helpers import fixed_loss, recipe_dict, train_keeping_parts


def unet_output(pipe, seed=0) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    images = pipe(["a purple sks"], num_inference_steps=3, guidance_scale=3.0, height=32, width=32,
                  generator=generator, output_type="np").images
    return images


@pytest.fixture(scope="module")
def trained(tiny_base, concept_dir, tmp_path_factory):
    """One LoRA run (U-Net + text encoder) with the loaded components kept for inspection."""
    out = tmp_path_factory.mktemp("lora") / "out"
    recipe = parse_recipe(recipe_dict(
        tiny_base, concept_dir, out, train={"max_steps": 30, "learning_rate": 5e-3, "batch_size": 4},
        strategy={"kind": "lora", "rank": 4, "alpha": 8, "text_encoder": True,
                  "text_encoder_learning_rate": 1e-3}))
    family = StableDiffusion()
    reference = family.load(str(tiny_base))
    pixels = torch.stack([torch.from_numpy(np.asarray(
        __import__("PIL.Image", fromlist=["Image"]).open(p).convert("RGB"), dtype=np.float32) / 127.5 - 1)
        .permute(2, 0, 1) for p in sorted(concept_dir.glob("*.png"))])
    captions = ["a purple sks"] * len(pixels)
    before = fixed_loss(family, reference, pixels, captions)
    artifact, parts = train_keeping_parts(recipe)
    after = fixed_loss(family, parts, pixels, captions)
    return {"artifact": artifact, "parts": parts, "reference": reference, "before": before, "after": after,
            "recipe": recipe}


def test_loss_falls_on_fixed_data(trained):
    assert trained["after"] < trained["before"] * 0.9, (trained["before"], trained["after"])


def test_only_lora_parameters_change(trained):
    parts, reference = trained["parts"], trained["reference"]
    for name in ("unet", "text_encoder", "vae"):
        tuned = dict(getattr(parts, name).named_parameters())
        for key, value in getattr(reference, name).named_parameters():
            # peft moves a wrapped layer's weight to `<layer>.base_layer.weight`
            wrapped = key.rsplit(".", 1)[0] + ".base_layer." + key.rsplit(".", 1)[1]
            twin = tuned.get(key, tuned.get(wrapped))
            assert twin is not None, key
            assert torch.equal(twin, value), f"{name}.{key} changed"
        lora = {k: v for k, v in tuned.items() if "lora_" in k}
        assert bool(lora) == (name != "vae")
        if lora:
            assert any(k.endswith("lora_B.default.weight") and v.abs().sum() > 0 for k, v in lora.items())


def test_artifact_has_diffusers_keys_and_training_metadata(trained):
    with safe_open(str(trained["artifact"]), framework="pt") as handle:
        keys, meta = list(handle.keys()), handle.metadata()
    assert trained["artifact"].name == "pytorch_lora_weights.safetensors"
    assert any(k.startswith("unet.") and k.endswith("to_q.lora_A.weight") for k in keys)
    assert any(k.startswith("text_encoder.") and "q_proj.lora_B" in k for k in keys)
    assert all(".lora_A." in k or ".lora_B." in k for k in keys)
    assert meta["finetune.strategy"] == "lora" and meta["finetune.rank"] == "4" and float(meta["finetune.alpha"]) == 8
    assert meta["finetune.steps"] == "30"
    assert meta["finetune.base_model"] == str(trained["recipe"].model.base)
    assert json.loads(meta["finetune.recipe"])["train"]["max_steps"] == 30
    adapter = json.loads(meta["lora_adapter_metadata"])
    # alpha / rank (8 / 4) is folded into lora_B, so the file's alpha is its rank (ComfyUI and Forge read no header)
    assert adapter["unet.r"] == 4 and adapter["unet.lora_alpha"] == 4


def test_stock_loader_reproduces_the_trained_model(trained, tiny_base):
    """diffusers' load_lora_weights on our file gives what the trained modules compute (alpha included)."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_base)
    base_images = unet_output(pipe)
    pipe.load_lora_weights(str(trained["artifact"]))
    loaded_images = unet_output(pipe)
    trained_pipe = StableDiffusion().pipeline(trained["parts"])
    trained_images = unet_output(trained_pipe)
    assert np.abs(loaded_images - base_images).max() > 1e-3  # the adapter changes the output
    np.testing.assert_allclose(loaded_images, trained_images, atol=1e-5)


def test_load_adapter_scale_zero_is_the_base(trained, tiny_base):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_base)
    base_images = unet_output(pipe)
    name = finetune.load_adapter(pipe, trained["artifact"], scale=0.0)
    np.testing.assert_array_equal(unet_output(pipe), base_images)
    pipe.set_adapters([name], adapter_weights=[1.0])
    assert np.abs(unet_output(pipe) - base_images).max() > 1e-3


def test_dora_and_custom_targets_round_trip(tiny_base, concept_dir, tmp_path):
    recipe = parse_recipe(recipe_dict(
        tiny_base, concept_dir, tmp_path / "out", train={"max_steps": 3, "learning_rate": 1e-2},
        strategy={"kind": "lora", "rank": 2, "use_dora": True, "target_modules": ["to_k", "to_v", "proj_in"]}))
    artifact = loop.train(recipe)
    with safe_open(str(artifact), framework="pt") as handle:
        keys = list(handle.keys())
    assert any("lora_magnitude_vector" in k for k in keys)
    assert any("proj_in.lora_A" in k for k in keys) and not any("to_q." in k for k in keys)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_base)
    base_images = unet_output(pipe)
    finetune.load_adapter(pipe, artifact)
    assert np.abs(unet_output(pipe) - base_images).max() > 1e-4


def test_bf16_mixed_precision_keeps_lora_weights_fp32(tiny_base, concept_dir, tmp_path):
    recipe = parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "out",
                                      train={"max_steps": 2, "mixed_precision": "bf16"}))
    artifact = loop.train(recipe)
    with safe_open(str(artifact), framework="pt") as handle:
        dtypes = {handle.get_tensor(k).dtype for k in handle.keys()}
    assert dtypes == {torch.float32}


def test_sample_command_draws_at_the_resolution_the_adapter_was_trained_at(tiny_base, concept_dir, tmp_path, capsys):
    from PIL import Image
    from safetensors.torch import load_file, save_file

    from finetune.cli import main

    # the tiny base's own size is 32 px; this LoRA learned at 48
    artifact = loop.train(parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "out",
                                                   data={"resolution": 48}, train={"max_steps": 1})))
    silent = tmp_path / "silent.safetensors"  # the same weights without the header's recipe (another tool's file)
    save_file(load_file(str(artifact)), str(silent))

    def side(adapter, *extra: str) -> int:
        out = tmp_path / f"{len(list(tmp_path.glob('*.png')))}.png"
        assert main(["sample", "--base", str(tiny_base), "--adapter", str(adapter), "--prompt", "a purple sks",
                     "--steps", "1", "--num", "1", "--out", str(out), *extra]) == 0
        width, height = Image.open(out).size
        assert width == height
        return width

    assert side(artifact) == 48 and "drawing at 48 px, the resolution the adapter was trained at" in capsys.readouterr().out
    assert side(artifact, "--resolution", "40") == 40  # an explicit size wins
    assert side(silent) == 32  # a file that does not say: the model's own


def test_sample_command_writes_a_grid(trained, tiny_base, tmp_path):
    from PIL import Image

    from finetune.cli import main

    common = ["sample", "--base", str(tiny_base), "--prompt", "a purple sks", "--prompt", "a red circle",
              "--steps", "3", "--num", "2"]
    assert main(common + ["--out", str(tmp_path / "base.png")]) == 0
    assert main(common + ["--adapter", str(trained["artifact"]), "--scale", "0", "--out",
                          str(tmp_path / "zero.png")]) == 0
    assert main(common + ["--adapter", str(trained["artifact"]), "--out", str(tmp_path / "full.png")]) == 0
    base, zero, full = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("base", "zero", "full"))
    assert base.shape == (2 * 32, 2 * 32, 3)  # a row per prompt, --num columns
    np.testing.assert_array_equal(base, zero)
    assert np.abs(full.astype(int) - base.astype(int)).max() > 0
