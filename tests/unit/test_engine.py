"""The run says which distributed engine it got, and warns when the accelerate config asked for another: on a CPU
accelerate runs an FSDP config as plain training, silently (same numbers, nothing sharded)."""
from __future__ import annotations

import yaml

from finetune.training.engine import engine_report, requested_engine
from tests.helpers import recipe_dict


def test_what_was_asked_and_what_was_got():
    assert requested_engine({}) is None and requested_engine({"ACCELERATE_USE_FSDP": "true"}) == "FSDP"
    assert requested_engine({"ACCELERATE_USE_DEEPSPEED": "1"}) == "DEEPSPEED"
    line, warning = engine_report("FSDP", 4, "FSDP")
    assert "FSDP (parameters sharded), 4 process(es)" in line and warning is None
    assert engine_report("MULTI_CPU", 2, None)[1] is None
    _, warning = engine_report("MULTI_CPU", 2, "FSDP")
    assert "asks for FSDP" in warning and "nothing is sharded" in warning


def test_an_fsdp_config_on_a_cpu_is_named_for_what_it_is(tiny_base, concept_dir, tmp_path, monkeypatch, capsys):
    from finetune.cli import main

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --use_fsdp` hands the run
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(tiny_base, concept_dir, tmp_path / "out",
                                                 train={"max_steps": 1})))
    assert main(["train", str(recipe)]) == 0
    out, err = capsys.readouterr()
    assert "engine: one process, no distributed engine, 1 process(es)" in out
    assert "warning: the accelerate config asks for FSDP, but accelerate gave one process" in err


class _Parts:
    def __init__(self):
        self.checkpointed = None

    def enable_gradient_checkpointing(self, trained):
        self.checkpointed = trained


def _accelerator(kind: str):
    from types import SimpleNamespace

    plugin = SimpleNamespace(activation_checkpointing=False)
    return SimpleNamespace(distributed_type=SimpleNamespace(name=kind), state=SimpleNamespace(fsdp_plugin=plugin))


def test_gradient_checkpointing_under_fsdp_is_accelerates_not_the_models():
    # the model's own checkpointing around FSDP2-sharded blocks fails in bf16 on a GPU (recomputed inputs not cast)
    from finetune.training.engine import enable_gradient_checkpointing

    accelerator, parts = _accelerator("FSDP"), _Parts()
    enable_gradient_checkpointing(accelerator, parts, ["denoiser"])
    assert accelerator.state.fsdp_plugin.activation_checkpointing is True
    assert parts.checkpointed is None
    for kind in ("NO", "MULTI_GPU", "MULTI_CPU"):
        accelerator, parts = _accelerator(kind), _Parts()
        enable_gradient_checkpointing(accelerator, parts, ["denoiser"])
        assert parts.checkpointed == ["denoiser"]
        assert accelerator.state.fsdp_plugin.activation_checkpointing is False
