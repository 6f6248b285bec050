"""Hypernetworks: identity at init, strength 0 is the base, processors wrap and unwrap, stacking, training
through the shared loop, our file and AUTOMATIC1111's .pt (import and export), and pickle safety."""
from __future__ import annotations


import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from safetensors import safe_open

from finetune import load_adapter, unload_adapter
from finetune.export import hypernetwork as files
from finetune.io.pickle_files import UnsafePickleError
from finetune.models.base import pipeline_components
from finetune.models.tiny import build_tiny_pipeline
from finetune.networks import peft_layers
from finetune.networks.hypernetwork import (HyperMLP, Hypernetwork, HypernetworkProcessor, Structure, attach,
                                            detach, loaded, widths_of)
from finetune.recipe.load import RecipeError, parse_recipe
from finetune.training import loop
from tests.helpers import recipe_dict

HN = {"kind": "hypernetwork", "layer_structure": [1, 2, 1], "activation": "relu", "a1111_pt": True}
TRAIN = {"max_steps": 3, "batch_size": 2, "learning_rate": 1e-2, "seed": 0}


def _unet_output(pipe, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 7, pipe.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return pipe.unet(latents, torch.tensor([10, 500]), context).sample


def _random_network(unet, seed: int, self_attention: bool = False, **structure) -> Hypernetwork:
    torch.manual_seed(seed)
    network = Hypernetwork(Structure(widths=widths_of(unet, self_attention), self_attention=self_attention,
                                     **structure))
    for mlp in network.modules():
        if isinstance(mlp, HyperMLP):
            mlp.initialise("normal", zero_last=False, activation="linear")
            for layer in mlp.linears():
                torch.nn.init.normal_(layer.weight, std=0.3)  # big enough to change the output clearly
    return network.eval()


def test_zero_last_layer_and_strength_zero_change_nothing():
    pipe = build_tiny_pipeline(seed=0)
    before = _unet_output(pipe)
    fresh = Hypernetwork(Structure(widths=widths_of(pipe.unet, False)))
    for mlp in fresh.modules():
        if isinstance(mlp, HyperMLP):
            mlp.initialise("kaiming", zero_last=True, activation="relu")
    attach(pipe.unet, fresh.eval(), "fresh")
    assert torch.equal(_unet_output(pipe), before)  # an untrained network is the identity
    detach(pipe.unet)

    network = _random_network(pipe.unet, seed=1)
    attach(pipe.unet, network, "random")
    assert not torch.allclose(_unet_output(pipe), before, atol=1e-4)  # it does act
    network.set_strength(0.0)
    assert torch.equal(_unet_output(pipe), before)


def test_processors_are_wrapped_and_restored_and_networks_stack():
    pipe = build_tiny_pipeline(seed=0)
    original = dict(pipe.unet.attn_processors)
    assert all(isinstance(p, AttnProcessor2_0) for p in original.values())  # SDPA, diffusers' default
    before = _unet_output(pipe)
    a, b = _random_network(pipe.unet, seed=1), _random_network(pipe.unet, seed=2)
    wrapped = attach(pipe.unet, a, "a")
    # tiny: cross-attention context 32 wide, one cross-attention layer per transformer block
    assert wrapped == sum(1 for name in original if name.endswith("attn2.processor"))
    only_a = _unet_output(pipe)
    attach(pipe.unet, b, "b")
    both = _unet_output(pipe)
    assert not torch.allclose(both, only_a, atol=1e-4)
    for name, processor in pipe.unet.attn_processors.items():
        if name.endswith("attn2.processor"):
            assert isinstance(processor, HypernetworkProcessor) and processor.name == "b"
            assert processor.inner.name == "a" and processor.inner.inner is original[name]
        else:
            assert processor is original[name]
    detach(pipe.unet, "a")
    attach(pipe.unet, a, "a")  # now b first, then a: composition order matters
    assert not torch.allclose(_unet_output(pipe), both, atol=1e-5)
    detach(pipe.unet, "b")
    assert torch.allclose(_unet_output(pipe), only_a, atol=1e-6)
    detach(pipe.unet)
    assert pipe.unet.attn_processors == original  # the very same processor objects
    assert torch.equal(_unet_output(pipe), before)
    assert not any("finetune_hypernetworks" in k for k in pipe.unet.state_dict())


def test_self_attention_uses_the_unets_own_widths():
    pipe = build_tiny_pipeline(seed=0)
    assert widths_of(pipe.unet, False) == (32,)
    assert widths_of(pipe.unet, True) == (32, 64)
    count = attach(pipe.unet, _random_network(pipe.unet, seed=1, self_attention=True), "s")
    assert count == len(pipe.unet.attn_processors)  # every attention layer, self and cross


def test_a_network_for_another_base_is_refused_by_width():
    pipe = build_tiny_pipeline(seed=0)
    other = Hypernetwork(Structure(widths=(768,)))
    with pytest.raises(ValueError, match=r"widths \[768\].*made for another base"):
        attach(pipe.unet, other, "sd15")


def _train(recipe):
    """Train; the artifact and the strategy that trained it."""
    with loop.setup(recipe) as run:
        loop.run_steps(run)
        artifact = loop.finish(run)
    return artifact, run.strategy


def test_training_changes_only_the_network_and_every_file_loads_back(tiny_base, concept_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    recipe = parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "out", strategy=HN, train=TRAIN))
    artifact, strategy = _train(recipe)
    assert artifact == tmp_path / "out" / "hypernetwork.safetensors"
    with safe_open(str(artifact), framework="pt") as handle:
        header = handle.metadata()
        keys = set(handle.keys())
    structure = files.structure_from_header(header[files.HEADER_KEY])
    assert structure.layer_structure == (1.0, 2.0, 1.0) and structure.activation == "relu"
    assert header["finetune.strategy"] == "hypernetwork"
    # relu between the two linears: A1111's numbering linear.0 and linear.2
    assert keys == {f"32.{kv}.linear.{i}.{p}" for kv in "kv" for i in (0, 2) for p in ("weight", "bias")}

    trained_state = strategy.network.tensors()
    assert any(v.abs().sum() > 0 for k, v in trained_state.items() if "linear.2.weight" in k)  # it learned

    base_pipe = StableDiffusionPipeline.from_pretrained(str(tiny_base))
    untouched = {k: v.clone() for k, v in base_pipe.unet.state_dict().items()}
    before = _unet_output(base_pipe)
    name = load_adapter(base_pipe, artifact, scale=1.0)
    after = _unet_output(base_pipe)
    assert not torch.allclose(after, before, atol=1e-6)
    reference = Hypernetwork(structure)
    reference.load_tensors(trained_state)
    for key, value in reference.tensors().items():
        assert torch.equal(loaded(base_pipe.unet)[name].tensors()[key], value)
    unload_adapter(base_pipe, name)
    assert torch.equal(_unet_output(base_pipe), before)
    assert all(torch.equal(v, untouched[k]) for k, v in base_pipe.unet.state_dict().items())

    pt = tmp_path / "out" / "a1111" / "hypernetwork.pt"
    data = torch.load(pt, weights_only=True)
    assert data["layer_structure"] == [1.0, 2.0, 1.0] and data["activation_func"] == "relu"
    assert set(data[32][0]) == {"linear.0.weight", "linear.0.bias", "linear.2.weight", "linear.2.bias"}
    load_adapter(base_pipe, pt)
    # A1111 applies by width everywhere; at width 32 the tiny U-Net's first self-attention layers match too
    assert sum(isinstance(p, HypernetworkProcessor) for p in base_pipe.unet.attn_processors.values()) > 2
    unload_adapter(base_pipe)
    assert torch.equal(_unet_output(base_pipe), before)


def test_a1111_import_follows_its_module_numbering(tmp_path):
    """A file as AUTOMATIC1111 writes it with relu, layer norm and dropout: Linear, ReLU, LayerNorm, Dropout,
    Linear, LayerNorm -> tensors at linear.0, .2, .4 and .5 (written out by hand, not by our exporter)."""
    d = 32
    torch.manual_seed(0)

    def mlp_state():
        return {"linear.0.weight": torch.randn(2 * d, d), "linear.0.bias": torch.randn(2 * d),
                "linear.2.weight": torch.randn(2 * d), "linear.2.bias": torch.randn(2 * d),
                "linear.4.weight": torch.randn(d, 2 * d), "linear.4.bias": torch.randn(d),
                "linear.5.weight": torch.randn(d), "linear.5.bias": torch.randn(d)}

    data = {d: (mlp_state(), mlp_state()), "layer_structure": [1, 2, 1], "activation_func": "relu",
            "is_layer_norm": True, "use_dropout": True, "last_layer_dropout": True, "activate_output": False,
            "step": 100, "name": "hand", "sd_checkpoint": None, "sd_checkpoint_name": "x"}
    path = tmp_path / "hand.pt"
    torch.save(data, path)
    network = files.read_a1111_pt(path)
    mlp = network.pair(d)[0]
    assert [type(m).__name__ for m in mlp.linear] == ["Linear", "ReLU", "LayerNorm", "Dropout", "Linear", "LayerNorm"]
    assert torch.equal(mlp.linear[4].weight, data[d][0]["linear.4.weight"])
    x = torch.randn(3, d)
    mlp.eval()
    by_hand = torch.nn.functional.layer_norm(
        torch.relu(x @ data[d][0]["linear.0.weight"].T + data[d][0]["linear.0.bias"]), (2 * d,),
        data[d][0]["linear.2.weight"], data[d][0]["linear.2.bias"])
    by_hand = torch.nn.functional.layer_norm(by_hand @ data[d][0]["linear.4.weight"].T + data[d][0]["linear.4.bias"],
                                             (d,), data[d][0]["linear.5.weight"], data[d][0]["linear.5.bias"])
    assert torch.allclose(mlp(x), x + by_hand, atol=1e-5)
    # and it survives our export: same numbering, same tensors
    again = files.from_a1111(files.to_a1111(network, name="hand", weight_init="normal", step=100, base_model="x"))
    assert all(torch.equal(again.tensors()[k], v) for k, v in network.tensors().items())


class _WritesAFile:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_a_malicious_pickle_is_refused_without_running(tmp_path):
    victim = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pt"
    torch.save({32: ({}, {}), "payload": _WritesAFile(str(victim))}, path)
    pipe = build_tiny_pipeline(seed=0)
    with pytest.raises(UnsafePickleError, match="could run code"):
        load_adapter(pipe, path)
    assert not victim.exists()


def test_frozen_base_switches_the_network_off():
    from finetune.strategies.hypernetwork import Options, Strategy

    pipe = build_tiny_pipeline(seed=0)
    before = _unet_output(pipe)
    strategy = Strategy(Options(kind="hypernetwork", zero_init_last=False, weight_init="xavier"))
    parts = pipeline_components(pipe, "tiny", noise_scheduler=None)
    strategy.prepare(None, parts)
    strategy.network.eval()
    assert not torch.allclose(_unet_output(pipe), before, atol=1e-6)
    with strategy.frozen_base(parts):
        assert torch.equal(_unet_output(pipe), before)
    assert not torch.allclose(_unet_output(pipe), before, atol=1e-6)


@pytest.mark.parametrize("options, message", [
    ({"layer_structure": [2, 1]}, "must start and end with 1"),
    ({"layer_structure": [1, 0, 1]}, "must be positive"),
    ({"activation": "gelu2"}, "not one of"),
    ({"dropout": 1.5}, "strategy.dropout: must be at least 0 and below 1, got 1.5"),
    ({"weight_init": "uniform"}, "weight_init"),
])
def test_bad_options_are_named(tiny_base, concept_dir, tmp_path, options, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "o", strategy={**HN, **options}))
    assert not (tmp_path / "o").exists()


def test_base_prediction_prior_reaches_the_hypernetwork(tiny_base, concept_dir, tmp_path):
    from safetensors.torch import load_file

    def run(out, **sections):
        return load_file(loop.train(parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / out, strategy=HN,
                                                             train=TRAIN, **sections))))

    plain = run("plain")
    prior = {"mode": "base_prediction", "class_prompt": "a red circle"}
    zero = run("zero", prior={**prior, "loss_weight": 0.0})
    weighted = run("one", prior={**prior, "loss_weight": 1.0})

    def largest_change(other):
        return max((plain[k] - other[k]).abs().max().item() for k in plain)

    # weight 0 follows the plain run up to float noise: its batch holds the prior half too, so the matmuls sum in
    # another order, and Adam's first steps (about lr x sign(gradient)) enlarge that noise on near-zero gradients
    # to ~1e-4 on some CPUs; the weighted prior moves the weights ~100 times further
    assert largest_change(zero) < 0.1 * largest_change(weighted)
    assert largest_change(weighted) > 1e-3


def test_a_lora_on_the_same_layers_combines_in_either_load_order():
    from peft import LoraConfig

    def lora_config():
        # init_lora_weights=False: B is random too, so the LoRA changes the output from the start
        return LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_v"], init_lora_weights=False)

    def add_lora(unet):
        torch.manual_seed(5)  # the same LoRA weights in both orders
        peft_layers.inject(unet, lora_config())

    outputs = []
    for hypernetwork_first in (True, False):
        pipe = build_tiny_pipeline(seed=0)
        if hypernetwork_first:
            attach(pipe.unet, _random_network(pipe.unet, seed=1), "h")
            add_lora(pipe.unet)
        else:
            add_lora(pipe.unet)
            attach(pipe.unet, _random_network(pipe.unet, seed=1), "h")
        outputs.append(_unet_output(pipe))
        detach(pipe.unet)
        only_lora = _unet_output(pipe)
        assert not torch.allclose(outputs[-1], only_lora, atol=1e-5)  # both act
    # the wrapper finds the LoRA layer at call time, so the LoRA branch sees the rewritten input either way
    assert torch.allclose(outputs[0], outputs[1], atol=1e-6)
