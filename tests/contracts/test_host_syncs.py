"""No step between log points reads a tensor back to Python (issue 35, item 2): on a GPU each such read makes the
host wait for the device, and the host then sets the pace. Every family's tiny model trains with LoRA (a family
added to finetune.models.FAMILY_MODULES is covered through specs()), and DreamBooth, textual inversion and a
hypernetwork train on SD, with `log.every: 4`; torch.Tensor's ways of handing a value to Python, and the operators
that wait for the device inside torch (boolean-mask indexing, nonzero), are counted while a step runs (from
LiveReport.start_step up to the point where the loop reads its unread losses), each with its call site.

On a CPU every tensor is on the host, so a read of a tensor that lives there by design on every device is told
apart by where it is made, each allowed below by name with the reason.
"""
from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from finetune.models import specs
from finetune.models.tiny import save_tiny_pipeline
from finetune.recipe.load import parse_recipe
from finetune.report.history import read_history
from finetune.report.live import LiveReport
from finetune.training import loop
from finetune.training.failures import TrainingDiverged
from tests.helpers import CONTRACT, NOT_YET, allowed_by, recipe_dict

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
# (file, function) of reads allowed inside a step, and why each cannot wait on a device:
CALLERS = {
    # host choices (textual inversion's templates, base_prediction's class prompts) are drawn from the step's CPU
    # generator on every device (finetune/draws.py refuses another): the tensor read is on the host
    ("finetune/draws.py", "host_choices"),
    # torch's non-fused optimizers keep their step counter on the CPU by design (torch/optim/adam.py: "Deliberately
    # host `step` on CPU if both capturable and fused are off") and read it there; on CUDA the loop's AdamW is the
    # fused one, whose counter stays on the GPU and is never read (training/optim.py)
    ("torch/optim/optimizer.py", "_get_value"),
    # --- reads inside diffusers' and transformers' own model code, which a caller cannot avoid ---
    # the LLM-type text encoders' causal-mask shortcut (Qwen3: Z-Image; Mistral: Flux.2; Qwen2.5-VL: Qwen-Image)
    # asks whether the padding mask is all ones (transformers/masking_utils.py:292 and :298): only while a text
    # encoder trains (LoRA's text_encoder: true), since the text cache encodes once, before the first step
    ("transformers/masking_utils.py", "_ignore_causal_mask_sdpa"),
    # QwenImagePipeline.encode_prompt splits the hidden states by each caption's length (:183) and asks whether
    # the mask is all ones (:265): again only while the text encoder trains
    ("diffusers/pipelines/qwenimage/pipeline_qwenimage.py", "_extract_masked_hidden"),
    ("diffusers/pipelines/qwenimage/pipeline_qwenimage.py", "encode_prompt"),
    # Lumina 2's RoPE takes each caption's length as a Python list (transformer_lumina2.py:273)
    ("diffusers/models/transformers/transformer_lumina2.py", "forward"),
    # HiDream's mixture of experts counts tokens per expert on the host (transformer_hidream_image.py:389), and its
    # unpatchify slices by the image sizes its own patchify made a device tensor (:696)
    ("diffusers/models/transformers/transformer_hidream_image.py", "moe_infer"),
    ("diffusers/models/transformers/transformer_hidream_image.py", "unpatchify"),
    # Qwen-Image 2.1's transformer reads its image-pad mask and prefix length (transformer_qwenimage21.py:689,
    # :967, :317)
    ("diffusers/models/transformers/transformer_qwenimage21.py", "forward"),
    ("diffusers/models/transformers/transformer_qwenimage21.py", "_qwenimage21_prefix_segments"),
    ("diffusers/models/transformers/transformer_qwenimage21.py", "build_token_metadata"),  # nonzero (:842)
    # ZImagePipeline._encode_prompt splits the states by the padding mask (boolean indexing, :249): only while a
    # text encoder trains
    ("diffusers/pipelines/z_image/pipeline_z_image.py", "_encode_prompt"),
    # --- finetune's own, NOT fixed yet (issue 35 follow-up): the Qwen-Image families trim the text to the
    # batch's longest caption and pass no mask when nothing is padded, as their pipelines do, reading the mask
    # on the device (qwen_image.py:106/110, qwen_image_2_1.py:120/126); the lengths could come from the host
    # (the tokenizer's or the text cache's) instead
    ("finetune/models/qwen_image.py", "predict"),
    ("finetune/models/qwen_image_2_1.py", "predict"),
    # likewise Z-Image hands its transformer each caption without its padding, split by boolean indexing of the
    # mask on the device as ZImagePipeline does (zimage.py:83, in predict, every step)
    ("finetune/models/zimage.py", "<listcomp>"),
}
# families whose backward pass assigns through a boolean mask (the gradient of a boolean split allowed above):
# Qwen-Image's, while its text encoder trains (QwenImagePipeline's _extract_masked_hidden), and Z-Image's (its
# caption split in predict, above)
BACKWARD_OF_AN_ALLOWED_SPLIT = {"qwen_image", "zimage"}
# (file, function) anywhere on the stack: work that is the host's by design
HOST_WORK = {
    # the data loader's (the batch order from its CPU generator, images read and collated), on every device, in
    # worker processes when data.num_workers > 0
    ("torch/utils/data/dataloader.py", "__next__"),
}
STEPS = 8
LOG_EVERY = 4


class ReadCounter:
    """Wraps torch.Tensor's READS; while `inside` a step, each call's stack is kept unless CALLERS or HOST_WORK
    allow it."""

    def __init__(self, monkeypatch):
        self.inside, self.reads, self.steps_seen, self.scans = False, [], 0, 0
        for name in READS:
            monkeypatch.setattr(torch.Tensor, name, self._counting(name, getattr(torch.Tensor, name)))
        start, read, scan = LiveReport.start_step, loop.UnreadLosses.read, loop._text_encoder_trains

        def start_step(report):
            self.inside, self.steps_seen = True, self.steps_seen + 1
            return start(report)

        def read_losses(unread, *args, **kwargs):
            self.inside = False  # a read point: from here reads are expected
            return read(unread, *args, **kwargs)

        def scanned(parts):
            self.scans += 1
            return scan(parts)

        monkeypatch.setattr(loop, "_text_encoder_trains", scanned)
        monkeypatch.setattr(LiveReport, "start_step", start_step)
        monkeypatch.setattr(loop.UnreadLosses, "read", read_losses)

    def _counting(self, name, original):
        def counted(tensor, *args, **kwargs):
            if self.inside:
                self.record(f"Tensor.{name}()", traceback.extract_stack()[:-1])
            return original(tensor, *args, **kwargs)

        return counted

    def record(self, what: str, stack: list) -> None:
        """Keep a read made inside a step, with its call site, unless CALLERS or HOST_WORK allow it."""
        if not (_made_in(stack[-1], CALLERS) or any(_made_in(frame, HOST_WORK) for frame in stack)):
            caller = stack[-1]
            self.reads.append(f"{what} in {caller.name} ({caller.filename}:{caller.lineno}), called from:\n"
                              + "".join(traceback.format_list(stack[-6:-1])))


class SyncingOperators(TorchDispatchMode):
    """The operators that make the host wait for a GPU from inside torch, where no Python-level read shows:
    those whose output size depends on the data (nonzero, masked_select, indexing or assigning by a boolean mask).
    Each met inside a step is recorded on `counter` like a read."""

    def __init__(self, counter: ReadCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.counter.inside and _waits_for_the_device(func, args):
            stack = traceback.extract_stack()[:-1]
            while stack and "site-packages/torch/" in stack[-1].filename.replace("\\", "/"):
                stack.pop()  # torch's own frames between the caller and this mode (dispatch, autograd)
            self.counter.record(f"aten.{func.overloadpacket.__name__}", stack)
        return func(*args, **(kwargs or {}))


def _waits_for_the_device(func, args) -> bool:
    aten = torch.ops.aten
    packet = func.overloadpacket
    if packet in (aten.nonzero, aten.masked_select, aten.nonzero_static):
        return packet is not aten.nonzero_static
    if packet in (aten.index, aten.index_put, aten.index_put_) and len(args) > 1:
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] or ())
    return False


def _made_in(frame: traceback.FrameSummary, places: set[tuple[str, str]]) -> bool:
    return any(frame.filename.replace("\\", "/").endswith(path) and frame.name == function
               for path, function in places)


def _train(base: Path, images: Path, out: Path, strategy: dict, monkeypatch, **sections) -> ReadCounter:
    recipe = parse_recipe(recipe_dict(base, images, out, strategy=strategy, log={"every": LOG_EVERY},
                                      train={"max_steps": STEPS, "learning_rate": 1e-3, "max_grad_norm": 1.0},
                                      **sections))
    with loop.setup(recipe) as run:
        counter = ReadCounter(monkeypatch)
        with SyncingOperators(counter):
            loop.run_steps(run)
        counter.inside = False
    assert counter.steps_seen == STEPS
    assert [record["step"] for record in read_history(out)] == list(range(1, STEPS + 1))  # every step recorded
    return counter


def _no_reads(counter: ReadCounter, family_name: str = "") -> None:
    sites = list(dict.fromkeys(counter.reads))  # each call site once, in the order met
    if family_name in BACKWARD_OF_AN_ALLOWED_SPLIT:
        sites = [site for site in sites if not site.startswith("aten.index_put in backward (")]
    assert not sites, (f"{len(counter.reads)} read(s) of a tensor inside steps between log points, from "
                       f"{len(sites)} call site(s):\n" + "\n".join(sites))


@pytest.mark.parametrize("family_name", list(specs()))  # every module in FAMILY_MODULES
def test_lora_steps_between_log_points_read_nothing_back(family_name, tiny_base, concept_dir, tmp_path,
                                                         monkeypatch):
    if ("lora", family_name) in NOT_YET:
        pytest.skip(NOT_YET[("lora", family_name)])
    base = tiny_base if family_name == "sd" else save_tiny_pipeline(tmp_path / "base", family=family_name)
    strategy = allowed_by(specs()[family_name], CONTRACT["lora"].options)  # with the text encoders where allowed
    counter = _train(base, concept_dir, tmp_path / "out", strategy, monkeypatch)
    _no_reads(counter, family_name)
    assert counter.scans == 1  # LoRA's on_step_end never changes what trains


@pytest.mark.parametrize("strategy, sections, scans", [
    # the text encoder stops training after step 3 (on_step_end says so: a second look at what trains), and
    # base_prediction picks class prompts
    ({**CONTRACT["dreambooth"].options, "text_encoder_steps": 3},
     {"prior": {"mode": "base_prediction", "class_prompt": ["a triangle", "a shape"]}}, 2),
    ({**CONTRACT["textual_inversion"].options, "prompts": "object"}, {}, 1),  # template picks every step
    (CONTRACT["hypernetwork"].options, {}, 1),
], ids=["dreambooth", "textual_inversion", "hypernetwork"])
def test_other_strategies_steps_read_nothing_back(strategy, sections, scans, tiny_base, concept_dir, tmp_path,
                                                  monkeypatch):
    """...and look at every parameter for a training text encoder once, and again only when on_step_end says
    what trains changed."""
    counter = _train(tiny_base, concept_dir, tmp_path / "out", strategy, monkeypatch, **sections)
    _no_reads(counter)
    assert counter.scans == scans


def test_a_read_inside_a_step_is_caught_with_its_call_site(tiny_base, concept_dir, tmp_path, monkeypatch):
    """The counter itself: a step that reads its loss (as the loop once did) fails, naming where."""
    original = loop.micro_step_loss

    def reading(*args, **kwargs):
        loss = original(*args, **kwargs)
        loss.item()
        return loss

    monkeypatch.setattr(loop, "micro_step_loss", reading)
    counter = _train(tiny_base, concept_dir, tmp_path / "out", CONTRACT["lora"].options, monkeypatch)
    assert len(counter.reads) == STEPS and "in reading" in counter.reads[0], counter.reads[:1]


def test_a_boolean_mask_inside_a_step_is_caught_too(tiny_base, concept_dir, tmp_path, monkeypatch):
    """Indexing by a boolean mask waits for the device inside torch (its size depends on the data), as textual
    inversion's row restore once did: no Python-level read shows it, the dispatch-level count does."""
    original = loop.micro_step_loss

    def masking(*args, **kwargs):
        loss = original(*args, **kwargs)
        return loss.reshape(1)[loss.reshape(1) > -1].sum()

    monkeypatch.setattr(loop, "micro_step_loss", masking)
    counter = _train(tiny_base, concept_dir, tmp_path / "out", CONTRACT["lora"].options, monkeypatch)
    # each step's forward index and its backward's index_put
    assert len(counter.reads) == 2 * STEPS and "aten.index in masking" in counter.reads[0], counter.reads[:1]


def test_a_loss_that_turns_nan_between_log_points_stops_naming_its_step(tiny_base, concept_dir, tmp_path,
                                                                        monkeypatch):
    """Read only every 4 steps, a NaN at step 2 still stops the run naming step 2, with nothing saved after it:
    step 1 is in the history, the checkpoint due at step 4 is never written."""
    original, calls = loop.micro_step_loss, []

    def nan_at_step_2(*args, **kwargs):
        calls.append(None)
        loss = original(*args, **kwargs)
        return loss * float("nan") if len(calls) >= 2 else loss

    monkeypatch.setattr(loop, "micro_step_loss", nan_at_step_2)
    out = tmp_path / "out"
    recipe = parse_recipe(recipe_dict(tiny_base, concept_dir, out, log={"every": LOG_EVERY},
                                      checkpoint={"every": LOG_EVERY}, train={"max_steps": STEPS}))
    with pytest.raises(TrainingDiverged, match=r"the loss became nan at step 2: .*saved nothing from this step"):
        loop.train(recipe)
    assert [record["step"] for record in read_history(out)] == [1]
    assert not (out / "checkpoints").exists() and not list(out.glob("*.safetensors"))
