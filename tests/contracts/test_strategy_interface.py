"""The strategy interface is what the loop uses, written out by every strategy (finetune/strategies/base.py): no
method inherited as a default, `options.trains_base_weights` true exactly where prepare leaves the denoiser's own
weights trainable, and per-encoder LoRA settings addressed by the part the family names."""
from __future__ import annotations

import inspect

import pytest

from finetune.models import family_for
from finetune.strategies import KINDS, create_strategy, options_class, strategy_module
from finetune.strategies.base import Strategy, StrategySetupError

OPTIONS = {
    "lora": {"rank": 4},
    "dreambooth": {},
    "textual_inversion": {"placeholder_token": ["<sks>"], "initializer_token": ["x"]},
    "hypernetwork": {"layer_structure": [1, 2, 1]},
}


def test_every_registered_strategy_has_options_here():
    assert set(OPTIONS) == set(KINDS), "add the new strategy's minimal options to OPTIONS"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_strategy_writes_out_every_method_of_the_interface(kind):
    interface = [name for name, _ in inspect.getmembers(Strategy, inspect.isfunction) if not name.startswith("_")]
    assert "loss" not in interface  # the loop takes the mean; no strategy reduced otherwise
    cls = strategy_module(kind).Strategy
    missing = [name for name in interface if name not in vars(cls)]
    assert not missing, f"{kind} inherits {missing}: write them in its own file"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_trains_base_weights_says_whether_the_denoisers_own_weights_train(kind, tiny_base):
    family = family_for("auto", str(tiny_base))
    parts = family.load(str(tiny_base))
    base_names = {name for name, _ in parts.denoiser.named_parameters()}
    options = options_class(kind)(kind=kind, **OPTIONS[kind])
    strategy = create_strategy(options)
    strategy.check(family, parts)
    strategy.prepare(family, parts)
    trained_base = [name for name, p in parts.denoiser.named_parameters() if p.requires_grad and name in base_names]
    assert options.trains_base_weights == bool(trained_base), trained_base[:3]


def test_text_encoder_2_keys_go_to_the_part_the_family_names_text_encoder_2():
    options = options_class("lora")(kind="lora", rank=4, text_encoder=True, text_encoder_2_rank=8,
                                    text_encoder_2_learning_rate=1e-5)
    assert options.text_encoder_settings(("text_encoder", "text_encoder_2")) == {
        "text_encoder": (4, None), "text_encoder_2": (8, 1e-5)}
    assert options.text_encoder_settings(("text_encoder",)) == {"text_encoder": (4, None)}


def test_text_encoder_2_on_a_family_that_adapts_only_its_first_encoder_is_refused(tmp_path):
    from finetune.models.tiny import save_tiny_pipeline

    folder = save_tiny_pipeline(tmp_path / "flux", family="flux")
    family = family_for("auto", str(folder))
    parts = family.load(str(folder))
    strategy = create_strategy(options_class("lora")(kind="lora", rank=4, text_encoder_2=True))
    # Flux has two text encoders (CLIP-L and T5), and its LoRA adapts CLIP-L alone: text_encoder_2 used to be
    # dropped without a word
    with pytest.raises(StrategySetupError, match="flux's LoRA adapts text_encoder, not its text_encoder_2"):
        strategy.check(family, parts)
