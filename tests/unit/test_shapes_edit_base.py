"""The edit base's metrics (edit fidelity, known-edit accuracy, drift) and its training script, on tiny models."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest

from finetune.shapes import edit_metrics, metrics
from finetune.shapes.checksums import mismatches
from finetune.shapes.edits import EDIT_VOCABULARY, HELD_OUT_EDIT, KNOWN_EDITS, NEW_EDIT
from finetune.shapes.paths import shapes_data_dir

SHAPES_DATA = shapes_data_dir()


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tiny_kontext():
    """A random FluxKontextPipeline built offline: the tiny Flux parts (T5 pads to 32 tokens, no guidance input)."""
    import torch
    from diffusers import FluxKontextPipeline

    from finetune.models.tiny_transformers import build_tiny_flux_pipeline

    torch.set_num_threads(1)  # tiny batches gain nothing from a second thread on a shared CPU
    return FluxKontextPipeline(**build_tiny_flux_pipeline(guidance_embeds=False).components)


class QueuedJudge:
    """Stands in for the evaluator: hands out prepared verdict lists, one per classify call, in order."""

    def __init__(self, *verdict_lists):
        self.queue = list(verdict_lists)

    def classify(self, images):
        verdicts = self.queue.pop(0)
        assert len(verdicts) == len(images)
        return verdicts


def test_figures_rest_on_200_samples_sampled_in_calls_of_at_most_64(tiny_kontext, monkeypatch):
    from diffusers import FluxKontextPipeline

    held_out, known = edit_metrics.held_out_pairs(), edit_metrics.known_pairs()
    assert len(held_out) == metrics.MIN_SAMPLES and len(known) == 209  # each figure: <= 0.5 points a sample
    assert {p.instruction for p in held_out} == {HELD_OUT_EDIT.instruction}
    assert all(p.control_labels["shape"] != "ring" for p in held_out)
    assert not {_png(p.control) for p in held_out} & {_png(p.control) for p in NEW_EDIT.draw_pairs()}
    assert [p.instruction for p in known] == [edit.instruction for edit in KNOWN_EDITS for _ in range(19)]
    # the judge: 150 of the 200 rings right; of the known edits, every recolour judged in the wrong colour
    fidelity_verdicts = [p.target_labels if i < 150 else {**p.target_labels, "shape": "circle"}
                         for i, p in enumerate(held_out)]
    known_verdicts = [{**p.target_labels, "colour": "red" if p.target_labels["colour"] != "red" else "blue"}
                      if p.instruction.startswith("make it") else p.target_labels for p in known]
    calls, original = [], FluxKontextPipeline.__call__

    def spy(self, **kwargs):
        calls.append(kwargs)
        return original(self, **kwargs)

    monkeypatch.setattr(FluxKontextPipeline, "__call__", spy)
    monkeypatch.setattr(metrics, "STEPS", 1)  # what is counted here does not depend on the steps
    figures = edit_metrics.report(tiny_kontext, QueuedJudge(fidelity_verdicts, known_verdicts), known_before=0.5)
    assert figures == pytest.approx({"edit_fidelity": 0.75, "known_edit_accuracy": 95 / 209,
                                     "drift_points": 100 * (0.5 - 95 / 209)})
    assert [len(call["prompt"]) for call in calls] == [64, 64, 64, 8, 64, 64, 64, 17]
    assert [p for call in calls for p in call["prompt"]] == [p.instruction for p in held_out + known]
    for call in calls:
        assert len(call["image"]) == len(call["prompt"]) == call["latents"].shape[0]
        assert call["image"][0].size == (32, 32) and call["_auto_resize"] is False
        assert call["max_area"] == 32 * 32 and call["max_sequence_length"] == 32  # the tiny T5's model_max_length
    assert [_png(i) for i in calls[0]["image"]] == [_png(p.control) for p in held_out[:64]]
    assert edit_metrics.drift_points(0.95, 0.92) == pytest.approx(3.0)


def test_sampling_does_not_depend_on_how_the_images_are_split_into_calls(tiny_kontext, monkeypatch):
    pairs = NEW_EDIT.draw_pairs()[:5]
    controls, instructions = [p.control for p in pairs], [p.instruction for p in pairs]
    monkeypatch.setattr(metrics, "STEPS", 2)
    together = edit_metrics.sample_edits(tiny_kontext, controls, instructions, seed=4)
    monkeypatch.setattr(metrics, "BATCH_IMAGES", 2)
    split = edit_metrics.sample_edits(tiny_kontext, controls, instructions, seed=4)
    assert len(split) == 5 and split[0].size == (32, 32)
    for a, b in zip(together, split):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 2
    other_noise = edit_metrics.sample_edits(tiny_kontext, controls, instructions, seed=5)
    assert any(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() > 2
               for a, b in zip(together, other_noise))


def test_training_script_trains_and_saves_a_kontext_folder_that_loads_and_edits(tmp_path, monkeypatch):
    import torch
    from diffusers import FluxKontextPipeline
    from safetensors.torch import load_file

    # three steps on 64 pairs: the architecture, tokenizers, scheduler and latent normalisation the full run ships
    out = tmp_path / "edit_base"
    result = subprocess.run([sys.executable, str(SHAPES_DATA / "train_edit_base.py"), "--out", str(out),
                             "--steps", "3", "--every", "3", "--pairs", "64", "--eval-samples", "11"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 3: own-edit accuracy" in result.stdout
    assert mismatches(out, tmp_path / "edit_base.sha256") == []
    assert sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) <= 20e6  # the limit
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "FluxKontextPipeline"
    pipe = FluxKontextPipeline.from_pretrained(out, dtype=torch.float32)
    config = pipe.transformer.config
    assert (config.in_channels, config.guidance_embeds, tuple(config.axes_dims_rope)) == (16, False, (8, 12, 12))
    assert edit_metrics.t5_tokens(pipe) == 16 and pipe.tokenizer.model_max_length == 16
    for word in EDIT_VOCABULARY:
        assert len(pipe.tokenizer.tokenize(word)) == 1 and len(pipe.tokenizer_2.tokenize(word)) == 1, word
    assert not pipe.scheduler.config.use_dynamic_shifting and pipe.scheduler.config.shift == 1.0
    # the U-Net base's autoencoder weights, with Flux's shift and scale set from the drawn targets
    made, unet_base = (load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
                       for folder in (out, SHAPES_DATA / "base"))
    assert made.keys() == unet_base.keys() and all((made[k] == unet_base[k]).all() for k in made)
    assert pipe.vae.config.shift_factor is not None and 0.3 < pipe.vae.config.scaling_factor < 3
    # it samples at 32 px, and the control image reaches the transformer: another control, another result
    torch.set_num_threads(1)
    monkeypatch.setattr(metrics, "STEPS", 2)
    pairs = NEW_EDIT.draw_pairs()[:2]
    first = edit_metrics.sample_edits(pipe, [pairs[0].control] * 2, [pairs[0].instruction] * 2, seed=1)
    swapped = edit_metrics.sample_edits(pipe, [pairs[0].control, pairs[1].control], [pairs[0].instruction] * 2,
                                        seed=1)
    assert first[0].size == (32, 32)
    assert np.array_equal(np.asarray(first[0]), np.asarray(swapped[0]))
    assert not np.array_equal(np.asarray(first[1]), np.asarray(swapped[1]))
