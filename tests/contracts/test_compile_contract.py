"""`train.compile: blocks` on every family and strategy (adding either to its list covers it): each repeated block
of the denoiser compiles as one graph with the strategy's layers inside (no graph break: `fullgraph=True` makes one
an error), and the compiled model computes the eager loss and the same gradients for what trains.

The matrix traces with dynamo and AOT autograd (backend "aot_eager": the graphs inductor would receive, without
generating C++ for each, which would take an hour on two cores); inductor itself compiles Flux's transformer blocks
below, and SD's U-Net blocks in a whole run (tests/unit/test_compile_modes.py).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from finetune.draws import step_draws
from finetune.models import family_for, specs
from finetune.recipe.load import parse_recipe
from finetune.training import loop
from finetune.training.compile import CompileFigures, compile_denoiser
from finetune.training.step import micro_step_loss
from tests.helpers import CONTRACT, NOT_YET, allowed_by, recipe_dict, reset_accelerate

PAIRS = [(kind, family) for family in specs() for kind in CONTRACT if (kind, family) not in NOT_YET]


def loss_and_gradients(run) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-step's loss on the run's first batch with fixed draws, and the gradient of each trained tensor."""
    batch = next(iter(run.loader))
    torch.manual_seed(0)
    # as the loop sets it: textual inversion trains the text encoders' input embeddings
    settings = dataclasses.replace(run.settings, text_encoder_trains=any(
        p.requires_grad for module in run.parts.text_encoder_modules().values() for p in module.parameters()))
    loss = micro_step_loss(run.family, run.parts, run.strategy, batch, None, step_draws(0, "cpu"), settings,
                           run.encoder)
    loss.backward()
    # the optimizer's tensors, in its order (the same objects compiled and eager: compiling is in place); a
    # tensor the step does not reach has no gradient eagerly and zeros compiled: both count as zeros
    gradients = {i: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                 for i, p in enumerate(run.params)}
    run.optimizer.zero_grad(set_to_none=True)
    return loss.detach(), gradients


def compiled_against_eager(kind: str, family_name: str, base, images, out, backend: str, **variant):
    options = {**allowed_by(specs()[family_name], CONTRACT[kind].options), **variant}
    recipe = parse_recipe(recipe_dict(base, images, out, strategy=options,
                                      train={"max_steps": 1, "batch_size": 2, "compile": "off"}))
    family = family_for(family_name)
    try:
        with loop.setup(recipe, family=family) as run:
            eager = loss_and_gradients(run)
            torch._dynamo.reset()
            before = CompileFigures.now()
            count = compile_denoiser(run.parts.denoiser, "blocks", family.spec.compile_blocks, fullgraph=True,
                                     backend=backend)
            compiled = loss_and_gradients(run)
            figures = CompileFigures.now().since(before)
    finally:
        reset_accelerate()
        torch._dynamo.reset()
    return eager, compiled, count, figures


def assert_same(eager, compiled, rtol: float, atol: float) -> None:
    (loss, gradients), (compiled_loss, compiled_gradients) = eager, compiled
    torch.testing.assert_close(compiled_loss, loss, rtol=rtol, atol=atol)
    assert gradients and gradients.keys() == compiled_gradients.keys()
    assert any(g.abs().sum() > 0 for g in gradients.values()), "nothing trains: the comparison would prove nothing"
    for name, gradient in gradients.items():
        torch.testing.assert_close(compiled_gradients[name], gradient, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("kind, family_name", PAIRS, ids=[f"{k}-{f}" for k, f in PAIRS])
def test_blocks_compile_whole_and_compute_as_eager(kind, family_name, tiny_bases, concept_dir, tmp_path):
    eager, compiled, count, figures = compiled_against_eager(kind, family_name, tiny_bases[family_name],
                                                             concept_dir, tmp_path / "out", "aot_eager")
    assert count >= 1, f"{count} block(s) compiled: the family's repeated blocks were not found"
    assert figures.graphs >= 1 and figures.graph_breaks == 0
    assert_same(eager, compiled, rtol=1e-5, atol=1e-6)


# peft's other adapters, on a U-Net and a transformer (the matrix above trains plain LoRA)
VARIANTS = {"loha": {"variant": "loha"}, "lokr": {"variant": "lokr"}, "oft": {"variant": "oft", "alpha": None},
            "dora": {"use_dora": True}}


@pytest.mark.parametrize("family_name", ["sd", "flux"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lora_variants_compile_whole_and_compute_as_eager(variant, family_name, tiny_bases, concept_dir, tmp_path):
    eager, compiled, count, figures = compiled_against_eager("lora", family_name, tiny_bases[family_name],
                                                             concept_dir, tmp_path / "out", "aot_eager",
                                                             **VARIANTS[variant])
    assert count >= 1 and figures.graphs >= 1 and figures.graph_breaks == 0
    assert_same(eager, compiled, rtol=1e-5, atol=1e-6)


def test_inductor_compiles_the_blocks_of_a_transformer(tiny_bases, concept_dir, tmp_path):
    eager, compiled, count, figures = compiled_against_eager("lora", "flux", tiny_bases["flux"],
                                                             concept_dir, tmp_path / "out", "inductor")
    assert figures.graphs >= 1 and figures.graph_breaks == 0
    # inductor fuses and reorders float sums: equal to rounding, not bit for bit
    assert_same(eager, compiled, rtol=1e-4, atol=1e-5)
