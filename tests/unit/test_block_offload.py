"""train.offload (finetune/training/block_offload.py): the mechanics on the CPU, where the "device" copy is a real copy
of each frozen weight: hooks in order, forward outputs and every LoRA gradient equal to a run without offload (with
gradient checkpointing's recomputation, as diffusers runs it), no stale weight, trained parameters never moved, at
most two streamed blocks on the device at once; which blocks are chosen; validate's refusals; and a tiny Flux
trained through the loop with and without it, to the same artifact."""
from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

from finetune.models import spec_of
from finetune.training import block_offload
from finetune.training.block_offload import BlockStreamer, block_count, held_back, spread


class Block(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.to_q = torch.nn.Linear(width, width)
        self.ff = torch.nn.Linear(width, width)

    def forward(self, x):
        return x + self.ff(torch.nn.functional.gelu(self.to_q(self.norm(x))))


class Denoiser(torch.nn.Module):
    """Blocks in a ModuleList, each checkpointed while grad is on (as diffusers' transformers do)."""
    _repeated_blocks = ["Block"]

    def __init__(self, width: int = 8, depth: int = 5):
        super().__init__()
        self.proj_in = torch.nn.Linear(width, width)
        self.blocks = torch.nn.ModuleList(Block(width) for _ in range(depth))

    def forward(self, x):
        x = self.proj_in(x)
        for block in self.blocks:
            x = (torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) if torch.is_grad_enabled()
                 else block(x))
        return x


def _pair(depth: int = 5):
    """(plain, streamed, the streamer, its trace): one LoRA-injected denoiser and an exact copy whose blocks 1
    and 3 stream."""
    torch.manual_seed(0)
    plain = inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q", "ff"], init_lora_weights=False),
                                    Denoiser(depth=depth))
    for name, param in plain.named_parameters():
        param.requires_grad_("lora_" in name)
    streamed = copy.deepcopy(plain)
    trace: list = []
    streamer = BlockStreamer(streamed, [streamed.blocks[1], streamed.blocks[3]], torch.device("cpu"), trace=trace)
    return plain, streamed, streamer, trace


def _lora_grads(model):
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.requires_grad}


def test_outputs_and_every_lora_gradient_equal_the_run_without_offload():
    plain, streamed, _, _ = _pair()
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    for model in (plain, streamed):
        model(x).square().mean().backward()
    assert torch.equal(plain(x), streamed(x))
    ours, theirs = _lora_grads(streamed), _lora_grads(plain)
    assert set(ours) == set(theirs) and len(ours) == 5 * 2 * 2
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    with torch.no_grad():  # sample grids: no gradient, the same forward
        assert torch.equal(plain(x), streamed(x))


def test_hooks_copy_ahead_use_and_release_in_order_forward_and_backward():
    _, streamed, _, trace = _pair()
    streamed(torch.randn(2, 8)).sum().backward()
    # positions among the streamed blocks: 0 is blocks[1], 1 is blocks[3]. Forward: block 0 is copied as the
    # denoiser starts and block 1 while block 0 runs; the backward pass recomputes the last one first (copied as
    # the forward ends), and copies the previous one while it runs
    assert trace == [("copy", 0), ("use", 0), ("copy", 1), ("release", 0), ("use", 1), ("release", 1),
                     ("copy", 1),
                     ("use", 1), ("copy", 0), ("release", 1), ("use", 0), ("release", 0)]
    in_use = loaded = most = 0
    for what, _ in trace:  # copies made but not yet released: never more than two streamed blocks
        loaded += what == "copy"
        in_use, loaded = in_use + (what == "use"), loaded - (what == "use")
        in_use -= what == "release"
        most = max(most, in_use + loaded)
    assert most == 2


def test_the_weights_used_are_device_copies_and_trained_parameters_never_move():
    _, streamed, streamer, _ = _pair()
    block = streamed.blocks[3]
    resting = block.ff.base_layer.weight
    trained = {name: (param, param.data_ptr()) for name, param in streamed.named_parameters() if param.requires_grad}
    seen = []
    block.ff.base_layer.register_forward_pre_hook(lambda m, a: seen.append((m.weight, m.weight.data_ptr())))
    streamed(torch.randn(2, 8)).sum().backward()
    assert len(seen) == 2  # the forward and the recomputation
    for weight, pointer in seen:
        assert weight is not resting and pointer != resting.data_ptr() and torch.equal(weight, resting)
    assert block.ff.base_layer.weight is resting  # back at rest between steps
    for name, param in streamed.named_parameters():
        if param.requires_grad:
            assert trained[name] == (param, param.data_ptr()), name
    assert streamer.bytes == sum(p.numel() * 4 for b in (streamed.blocks[1], streamed.blocks[3])
                                 for p in b.parameters() if not p.requires_grad)


def test_a_frozen_weight_changed_between_steps_is_seen():
    plain, streamed, _, _ = _pair()
    x = torch.randn(2, 8)
    streamed(x).sum().backward()
    before = streamed(x).detach()
    for model in (plain, streamed):
        with torch.no_grad():
            model.blocks[3].ff.base_layer.weight.mul_(-2.0)
            model.blocks[1].norm.bias.add_(0.5)
    assert torch.equal(plain(x), streamed(x)) and not torch.equal(before, streamed(x))


def test_a_forward_without_backward_leaves_no_stale_copy():
    plain, streamed, streamer, _ = _pair()
    x = torch.randn(2, 8)
    streamed(x)  # grad on, no backward: the last block's copy is made for a backward that never comes
    with torch.no_grad():
        for model in (plain, streamed):
            model.blocks[3].ff.base_layer.weight.zero_()
    assert torch.equal(plain(x), streamed(x))
    streamer.remove()
    assert not streamed._forward_pre_hooks and not streamed.blocks[1]._forward_hooks


def test_held_back_blocks_keep_their_frozen_weights_where_they_are():
    _, streamed, _, _ = _pair()
    with held_back([streamed.blocks[1]]):
        streamed.to(torch.float64)  # a fake device move: the dtype shows what moved
    assert streamed.blocks[1].ff.base_layer.weight.dtype == torch.float32
    assert streamed.blocks[1].ff.lora_A.default.weight.dtype == torch.float64  # trained: moved
    assert streamed.blocks[0].ff.base_layer.weight.dtype == torch.float64


def test_counts_fractions_and_spread():
    assert block_count(3, 57) == 3 and block_count(0.5, 57) == 28 and block_count(0.01, 10) == 1
    assert spread(10, 5) == [1, 3, 5, 7, 9]
    assert spread(4, 4) == [0, 1, 2, 3] and spread(57, 1) == [28]
    assert len(spread(57, 28)) == 28 and len(spread(60, 60)) == 60


def test_the_blocks_are_the_family_s_and_too_many_are_refused():
    denoiser = Denoiser(depth=4)
    flux = spec_of("flux")  # no declared blocks: the denoiser's own _repeated_blocks
    assert block_offload.chosen_blocks(denoiser, flux, 0.5) == [denoiser.blocks[1], denoiser.blocks[3]]
    with pytest.raises(ValueError, match="has 4 transformer blocks; ask for at most 4"):
        block_offload.chosen_blocks(denoiser, flux, 5)
    assert block_offload.block_classes(spec_of("hidream"), denoiser) == ("HiDreamBlock",)
    assert spec_of("sd").offload_blocks == () and spec_of("sdxl").offload_blocks == ()


@pytest.mark.parametrize("change, says", [
    ({"blocks": 2.5}, "a count of blocks (1, 2, ...) or a fraction"),
    ({"blocks": 0}, "a count of blocks"),
    ({"blocks": float("inf")}, "a count of blocks"),
    ({"blocks": float("nan")}, "a count of blocks"),
    ({"streams": False}, "is a U-Net"),
    ({"trains_base_weights": True}, "DreamBooth trains the blocks' own weights"),
    ({"gradient_checkpointing": False}, "needs train.gradient_checkpointing: true"),
    ({"compile_mode": "blocks"}, "train.compile: blocks cannot go with block offload"),
    ({"engine": "FSDP"}, "FSDP already shards"),
])
def test_what_validate_refuses(change, says):
    asked = {"blocks": 4, "family": "SD", "streams": True, "trains_base_weights": False,
             "gradient_checkpointing": True, "compile_mode": "auto", "engine": None}
    assert block_offload.problems(**{k: v for k, v in asked.items() if k != "blocks"}, blocks=asked["blocks"]) == []
    asked.update(change)
    found = block_offload.problems(**{k: v for k, v in asked.items() if k != "blocks"}, blocks=asked["blocks"])
    assert len(found) == 1 and says in found[0]


def _realign(parts):
    for param in parts.denoiser.parameters():
        if not param.requires_grad:
            param.data = param.data.clone()


def test_a_tiny_flux_trains_to_the_same_lora_with_its_blocks_streamed(tmp_path, caplog, monkeypatch):
    """Through setup and the loop, with gradient checkpointing: the same artifact tensors, bit for bit, and the
    summary says what streams. Both runs get their frozen weights copied into fresh memory first, as the streamed
    copies are: loaded from safetensors they sit at offsets in the mapped file, and CPU matmul kernels chosen by
    alignment differ in the last bit."""
    from safetensors.torch import load_file

    from finetune.models.tiny import save_tiny_pipeline
    from finetune.recipe.load import parse_recipe
    from tests.helpers import draw_concept, recipe_dict, train_keeping_parts

    from finetune.training import run as run_module

    seen = []  # parameters accelerate's prepare (which moves the model to the device) sees: not the streamed ones
    real = run_module.prepare_for_training
    monkeypatch.setattr(run_module, "prepare_for_training", lambda accelerator, modules, optimizer: (
        seen.append(sum(1 for m in modules.values() for _ in m.parameters())), real(accelerator, modules, optimizer))[1])
    base = save_tiny_pipeline(tmp_path / "tiny-flux", family="flux")
    images = draw_concept(tmp_path / "images", count=2)
    artifacts = []
    for offload in (None, {"blocks": 2}):
        recipe = recipe_dict(base, images, tmp_path / f"out-{len(artifacts)}",
                             train={"max_steps": 2, "gradient_checkpointing": True, "offload": offload})
        with caplog.at_level("INFO"):
            artifact, parts = train_keeping_parts(parse_recipe(recipe), before_steps=_realign)
        artifacts.append(load_file(artifact))
    plain, streamed = artifacts
    assert plain.keys() == streamed.keys() and plain
    for key in plain:
        assert torch.equal(plain[key], streamed[key]), (key, (plain[key] - streamed[key]).abs().max())
    assert "offload: 2 of 2 transformer blocks (FluxSingleTransformerBlock, FluxTransformerBlock)" in caplog.text
    assert parts.denoiser._forward_pre_hooks  # the streamer's hooks are on the trained denoiser
    frozen_in_blocks = sum(1 for b in (*parts.denoiser.transformer_blocks, *parts.denoiser.single_transformer_blocks)
                           for p in b.parameters() if not p.requires_grad)
    assert seen[0] - seen[1] == frozen_in_blocks > 0
