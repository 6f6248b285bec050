"""LoRA variants (LoHa, LoKr, OFT, DoRA, LoCon conv layers) on the tiny pipeline: each trains a few steps, saves, and
loads back into a fresh pipeline through `finetune.load_adapter` predicting exactly as the trained model did."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file

import finetune
from finetune.recipe.load import RecipeError, load_recipe, parse_recipe
from finetune.training import loop
from tests.helpers import recipe_dict, train_keeping_parts

# (variant options, what the file's keys must show); all train the U-Net's attention, some more
CASES = {
    "loha": ({"variant": "loha", "conv_layers": True, "conv_rank": 2, "text_encoder": True}, "hada_w1_a"),
    "lokr": ({"variant": "lokr", "conv_layers": True}, "lokr_w1"),
    "oft": ({"variant": "oft", "alpha": None, "text_encoder": True}, "oft_R.weight"),  # conftest's recipe sets alpha
    "lora_conv": ({"variant": "lora", "conv_layers": True, "conv_rank": 2, "conv_alpha": 4}, "lora_A.weight"),
    "dora": ({"use_dora": True, "conv_layers": True}, "lora_magnitude_vector"),
}
CONV_MODULES = {"down_blocks.0.resnets.0.conv1", "down_blocks.0.downsamplers.0.conv", "up_blocks.0.upsamplers.0.conv",
                "up_blocks.1.resnets.1.conv_shortcut", "mid_block.resnets.1.conv2"}


def variant_recipe(tiny_base, concept_dir, out, options, **train):
    return parse_recipe(recipe_dict(tiny_base, concept_dir, out, strategy={"kind": "lora", **options},
                                    train={"max_steps": 3, "learning_rate": 1e-2, **train}))


def outputs(unet, text_encoder) -> tuple[torch.Tensor, torch.Tensor]:
    """The U-Net's prediction and the text encoder's output on fixed inputs."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 32, 32, generator=generator)
    ids = torch.randint(0, 100, (2, 32), generator=generator)
    with torch.no_grad():
        return unet(latents, torch.tensor([50, 700]), context).sample, text_encoder(ids)[0]


def same(a: tuple, b: tuple) -> bool:
    return all(torch.allclose(x, y, atol=1e-5) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def trained(tiny_base, concept_dir, tmp_path_factory):
    """Each variant trained once: {case: (artifact, the trained model's outputs)}."""
    runs = {}
    for case, (options, _) in CASES.items():
        out = tmp_path_factory.mktemp(case) / "out"
        artifact, parts = train_keeping_parts(variant_recipe(tiny_base, concept_dir, out, options))
        runs[case] = (artifact, outputs(parts.unet, parts.text_encoder))
    return runs


@pytest.fixture
def pipe(tiny_base):
    return StableDiffusionPipeline.from_pretrained(tiny_base)


def base_outputs(pipe):
    return outputs(pipe.unet, pipe.text_encoder)


@pytest.mark.parametrize("case", CASES)
def test_loads_back_as_trained_and_unloads_to_the_base(case, trained, pipe):
    artifact, trained_outputs = trained[case]
    base = base_outputs(pipe)
    assert not same(trained_outputs, base)  # training changed what the model predicts
    name = finetune.load_adapter(pipe, artifact)
    assert same(base_outputs(pipe), trained_outputs)
    assert finetune.unload_adapter(pipe, name) == [name]
    assert torch.equal(base_outputs(pipe)[0], base[0]) and torch.equal(base_outputs(pipe)[1], base[1])


@pytest.mark.parametrize("case", ["loha", "lokr", "lora_conv"])
def test_scale_zero_is_the_base_and_half_is_in_between(case, trained, pipe):
    artifact, trained_outputs = trained[case]
    base = base_outputs(pipe)
    name = finetune.load_adapter(pipe, artifact, scale=0.0)
    assert same(base_outputs(pipe), base)
    finetune.unload_adapter(pipe, name)
    finetune.load_adapter(pipe, artifact, scale=0.5)
    half = base_outputs(pipe)[0]
    assert not torch.allclose(half, base[0], atol=1e-6) and not torch.allclose(half, trained_outputs[0], atol=1e-6)


def test_dora_scale_weights_the_direction_only(trained, pipe):
    """peft's (and diffusers') DoRA: scale multiplies the low-rank direction update; the trained magnitudes stay,
    so scale 0 is the base re-normed to them, not the base."""
    base = base_outputs(pipe)
    finetune.load_adapter(pipe, trained["dora"][0], scale=0.0)
    at_zero = base_outputs(pipe)
    assert not same(at_zero, base) and not same(at_zero, trained["dora"][1])


def test_oft_refuses_a_scale_and_leaves_the_pipeline_as_it_was(trained, pipe):
    with pytest.raises(ValueError, match="OFT adapter has no strength to scale.*scale 1"):
        finetune.load_adapter(pipe, trained["oft"][0], scale=0.5)
    assert pipe.get_list_adapters() == {}


@pytest.mark.parametrize("case", CASES)
def test_file_layout_and_header(case, trained):
    artifact, _ = trained[case]
    options, marker = CASES[case]
    with safe_open(str(artifact), framework="pt") as handle:
        keys, meta = list(handle.keys()), handle.metadata()
        shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in keys}
    assert artifact.name == "pytorch_lora_weights.safetensors"
    assert meta["finetune.strategy"] == "lora" and meta["finetune.variant"] == options.get("variant", "lora")
    assert any(k.startswith("unet.") and marker in k for k in keys)
    assert any(k.startswith("text_encoder.") for k in keys) == bool(options.get("text_encoder"))
    adapted = {k.split(".", 1)[1].rsplit(f".{marker}", 1)[0] for k in keys if marker in k and k.startswith("unet.")}
    if options.get("conv_layers"):
        assert CONV_MODULES <= adapted  # 3x3 and 1x1 ResNet convs, down/upsamplers
    else:
        assert not any("resnets" in m or "samplers" in m for m in adapted)
    assert not {"conv_in", "conv_out"} & adapted
    if options.get("variant", "lora") == "lora":  # diffusers' loader reads these
        assert "lora_adapter_metadata" in meta and "finetune.peft_config" not in meta
    else:
        config = json.loads(meta["finetune.peft_config"])
        assert config["unet"]["peft_type"] == options["variant"].upper()
    if case == "lora_conv":  # conv layers at their own rank, 3x3 kernels trained
        assert shapes["unet.down_blocks.0.resnets.0.conv1.lora_A.weight"] == (2, 32, 3, 3)
        assert shapes["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"][0] == 4
        up = load_file(artifact)["unet.down_blocks.0.resnets.0.conv1.lora_B.weight"]
        assert up.abs().sum() > 0  # lora_B starts at zero: nonzero means it trained
        adapter = json.loads(meta["lora_adapter_metadata"])
        # each module's alpha / rank is folded into its lora_B: the file's alphas are the ranks
        assert adapter["unet.rank_pattern"]["conv1"] == 2 and adapter["unet.alpha_pattern"]["conv1"] == 2
    if case == "loha":
        assert shapes["unet.down_blocks.0.resnets.0.conv1.hada_w1_b"] == (2, 32 * 3 * 3)


def test_conv_alpha_defaults_to_the_other_layers_scale():
    from finetune.strategies.lora_variants import peft_config

    config = peft_config("loha", rank=4, alpha=8, targets=["to_q"], conv_targets=["conv1"], conv_rank=2)
    assert (config.r, config.alpha, config.rank_pattern, config.alpha_pattern) == (4, 8, {"conv1": 2}, {"conv1": 4})


@pytest.mark.parametrize("variant", ["loha", "lokr", "oft", "dora"])
def test_resume_reproduces_the_uninterrupted_run(variant, tiny_base, concept_dir, tmp_path):
    options = {"use_dora": True} if variant == "dora" else {"variant": variant, "alpha": None}
    full = variant_recipe(tiny_base, concept_dir, tmp_path / "full", options, max_steps=4)
    uninterrupted = load_file(loop.train(full))
    part = parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "part", strategy={"kind": "lora", **options},
                                    train={"max_steps": 4, "learning_rate": 1e-2}, checkpoint={"every": 2}))
    loop.train(part)
    (tmp_path / "part" / "pytorch_lora_weights.safetensors").unlink()
    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step-000004", ignore_errors=True)
    resumed = load_file(loop.train(part, resume="latest"))
    assert uninterrupted.keys() == resumed.keys()
    for key in uninterrupted:
        assert torch.equal(uninterrupted[key], resumed[key]), key


@pytest.mark.parametrize("options", [{"variant": "loha", "conv_layers": True}, {"variant": "oft", "alpha": None}],
                         ids=["loha_conv", "oft"])
def test_bf16_mixed_precision_keeps_adapter_weights_fp32(options, tiny_base, concept_dir, tmp_path):
    artifact = loop.train(variant_recipe(tiny_base, concept_dir, tmp_path / "out", options, max_steps=2,
                                         mixed_precision="bf16"))
    assert {tensor.dtype for tensor in load_file(artifact).values()} == {torch.float32}


def test_a_file_for_another_base_is_refused_by_shape(trained):
    from finetune.models.tiny import build_tiny_pipeline

    other = build_tiny_pipeline(cross_attention_dim=16)  # attn2's to_k/to_v take 16 features, not 32
    with pytest.raises(ValueError, match=r"made for another base model.*attn2\.to_[kv]\S* is \[.*\] in the file "
                                         r"but \[.*\] in this model"):
        finetune.load_adapter(other, trained["lokr"][0])
    assert other.get_list_adapters() == {}  # nothing half-loaded stays


def test_oft_refuses_convolutions_named_in_target_modules(tiny_base, concept_dir, tmp_path):
    from finetune.strategies.base import StrategySetupError

    recipe = variant_recipe(tiny_base, concept_dir, tmp_path / "out",
                            {"variant": "oft", "alpha": None, "target_modules": ["to_q", "conv2"]})
    with pytest.raises(StrategySetupError,
                       match="oft they pick .* convolutions .*remove them from strategy.target_modules"):
        loop.train(recipe)
    assert not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()


BAD_OPTIONS = [
    ({"variant": "loha", "use_dora": True}, "strategy.use_dora: DoRA is a form of plain LoRA.*variant: lora"),
    ({"variant": "oft", "alpha": 8}, "strategy.alpha: OFT has no alpha.*remove it"),
    ({"variant": "oft", "alpha": None, "rank": 1}, "strategy.rank: with variant oft it is the block size"),
    ({"variant": "oft", "alpha": None, "conv_layers": True},
     "strategy.conv_layers: peft's OFT does not adapt 3x3 convolutions.*strategy.variant: lora, loha or lokr"),
    ({"variant": "lokr", "dropout": 0.1}, "strategy.dropout: applies to variant lora only"),
    ({"conv_rank": 2}, "conv_layers is false; set strategy.conv_layers: true or remove them"),
    ({"conv_layers": True, "conv_rank": 0}, "strategy.conv_rank: must be at least 1"),
    ({"variant": "ia3"}, "strategy.variant"),
]


@pytest.mark.parametrize("options, message", BAD_OPTIONS)
def test_validate_refuses_options_that_do_not_apply(options, message, tiny_base, concept_dir, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(tiny_base, concept_dir, tmp_path / "out",
                                               strategy={"kind": "lora", **options})))
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)


def test_validate_command_exits_2_on_a_variant_mismatch(tiny_base, concept_dir, tmp_path):
    from finetune.cli import main

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(tiny_base, concept_dir, tmp_path / "out",
                                               strategy={"kind": "lora", "variant": "lokr"})))
    assert main(["validate", str(path)]) == 0
    assert main(["validate", str(path), "strategy.use_dora=true"]) == 2


@pytest.mark.parametrize("case", CASES)
def test_merge_fuses_every_variant_into_plain_weights(case, trained, tiny_base, tmp_path):
    from finetune.models.stable_diffusion import StableDiffusion
    from finetune.tools.merge import merge

    artifact, trained_outputs = trained[case]
    merge(str(tiny_base), [(str(artifact), 1.0)], tmp_path / "merged", save_dtype="fp32")
    merged = StableDiffusion().load(str(tmp_path / "merged"))
    assert not any("base_layer" in name for name, _ in merged.unet.named_modules())  # no adapter left
    assert same(outputs(merged.unet, merged.text_encoder), trained_outputs)


@pytest.mark.parametrize("case, kind", [("loha", "loha adapter"), ("lokr", "lokr adapter"), ("oft", "oft adapter"),
                                        ("dora", "with DoRA"), ("lora_conv", "LoRA (diffusers/peft format)")])
def test_inspect_names_the_variant(case, kind, trained):
    from finetune.export.describe import describe

    assert kind in describe(trained[case][0])["kind"]
