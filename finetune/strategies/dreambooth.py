"""DreamBooth (Ruiz et al. 2023): the whole denoiser trains (or the layers strategy.trainable_modules names),
optionally the text encoder for the first steps.

Prior preservation is the loop's (recipe section `prior`), shared with every strategy; this strategy only
decides what trains and writes a whole diffusers pipeline folder. `finetune extract-lora` turns that folder
into a compact LoRA file. Launched with an FSDP accelerate config (recipes/accelerate/fsdp.yaml), the denoiser is
sharded over the GPUs; its weights are gathered whole for checkpoints and the saved pipeline.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from finetune.io.atomic import atomic_dir
from finetune.models.base import Components, ModelFamily, adaptable_text_encoders
from finetune.models.loading import cast
from finetune.paths import give_umask_permissions
from finetune.recipe.keys import key
from finetune.recipe.schema import StrategyOptions
from finetune.strategies.base import StrategySetupError, held_in
from finetune.distributed import full_state_dict, is_sharded, load_full_state_dict, unsharded_copy

log = logging.getLogger(__name__)
PIPELINE_DIR = "pipeline"
METADATA_FILE = "finetune.json"
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Options(StrategyOptions):
    text_encoder: bool = key(False, "Also train the text encoders' own weights: every one the family trains (SDXL's "
                                    "two; SD3's CLIPs, not T5).")
    text_encoder_learning_rate: Optional[float] = key(None, "The text encoders' learning rate; null: the denoiser's.",
                                                      above=0)
    text_encoder_steps: Optional[int] = key(None, "The text encoders train for this many first steps, then stay as "
                                                  "they are; null: to the end.", minimum=1)
    save_dtype: Literal["fp32", "fp16", "bf16"] = key("fp32", "The dtype of the saved pipeline's weights.")
    trainable_modules: list[str] = key(
        factory=list, help="Train only the denoiser's layers whose names end with one of these (matched as LoRA's "
                           "`target_modules`, e.g. `attn.to_q`), all their weights; empty: the whole denoiser. The "
                           "saved pipeline is whole either way; a name that matches no layer stops the run before "
                           "any work.")

    def changes_text_encoding(self) -> Optional[str]:
        return "strategy.text_encoder is true, so the text encoder trains" if self.text_encoder else None

    @property
    def trains_base_weights(self) -> bool:
        return True  # the denoiser's own weights (all, or trainable_modules')

    def validate(self, recipe: Any) -> list[str]:
        problems = []  # a key's own bounds are declared on it (finetune/recipe/keys.py)
        if not self.text_encoder and (self.text_encoder_learning_rate is not None
                                      or self.text_encoder_steps is not None):
            problems.append("strategy.text_encoder_*: set, but strategy.text_encoder is false; "
                            "set strategy.text_encoder: true or remove them")
        return problems


def named_matches(module: torch.nn.Module, patterns: list[str]) -> list[str]:
    """Names of `module`'s submodules equal to a pattern or ending with "." + pattern (peft's target_modules
    rule for a list of names)."""
    return [name for name, _ in module.named_modules()
            if any(name == p or name.endswith(f".{p}") for p in patterns)]


def _size_gib(module: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in module.parameters()) / 2**30


class Strategy:
    artifact_name = PIPELINE_DIR

    def __init__(self, options: Options):
        self.options = options
        self.family: ModelFamily | None = None
        self.parts: Components | None = None
        self.modules: dict[str, torch.nn.Module] = {}  # what trains, unwrapped
        self.frozen: dict[str, torch.nn.Module] = {}  # untouched copies, only for base_prediction prior
        self.gathered: dict[str, dict[str, torch.Tensor]] = {}  # whole weights of sharded modules (FSDP)
        self.text_encoders_stopped = False  # text_encoder_steps reached: on_step_end has frozen them

    def check(self, family: ModelFamily, parts: Components) -> None:
        missing = [p for p in self.options.trainable_modules if not named_matches(parts.denoiser, [p])]
        if missing:
            raise StrategySetupError(
                f"strategy.trainable_modules: {', '.join(missing)} names no layer of the "
                f"{parts.denoiser_name} ({type(parts.denoiser).__name__}); name layers as they appear in its "
                f"named_modules(), e.g. attn.to_q, or leave the list empty to train the whole {parts.denoiser_name}")

    def prepare(self, family: ModelFamily, parts: Components, keep_frozen_base: bool = False) -> None:
        self.family, self.parts = family, parts
        self.modules[parts.denoiser_name] = parts.denoiser
        if self.options.text_encoder:  # every text encoder the family trains (SDXL: both; SD3: the CLIPs, not T5)
            self.modules.update({name: parts.modules[name] for name in adaptable_text_encoders(family, parts)})
        if keep_frozen_base:
            # the base's own prediction needs the base as it was; an in-place trained U-Net cannot give it back
            for name, module in self.modules.items():
                self.frozen[name] = copy.deepcopy(module).requires_grad_(False).eval()
            extra = sum(_size_gib(m) for m in self.frozen.values())
            log.warning("prior.mode base_prediction with DreamBooth keeps a frozen copy of the %s on the device: "
                        "%.2f GiB more memory. prior.mode class_images needs no copy.",
                        " and ".join(self.frozen), extra)
        for module in self.modules.values():
            # trainable weights are fp32 whatever the frozen base's dtype; mixed precision casts per operation
            module.float().requires_grad_(True)
        if self.options.trainable_modules:
            parts.denoiser.requires_grad_(False)
            layers = dict(parts.denoiser.named_modules())
            for name in named_matches(parts.denoiser, self.options.trainable_modules):
                layers[name].requires_grad_(True)

    def parameter_groups(self, learning_rate: float) -> list[dict[str, Any]]:
        denoiser = self.parts.denoiser_name
        return [{"params": [p for p in module.parameters() if p.requires_grad],
                 "lr": learning_rate if name == denoiser else self.options.text_encoder_learning_rate or learning_rate}
                for name, module in self.modules.items()]

    @contextlib.contextmanager
    def frozen_base(self, parts: Components):
        if not self.frozen:
            raise RuntimeError("DreamBooth was prepared without keep_frozen_base; the base is no longer there")
        yield parts.with_modules(self.frozen)

    def as_loaded(self, dtype: torch.dtype):
        # the saved pipeline loaded in `dtype` holds every weight in it; while the grid is drawn the optimizer's
        # gradients are freed (zero_grad set_to_none), so the copy in `dtype` stays below training's peak
        return held_in(self.modules.values(), dtype)

    def prompts(self, captions: list[str], generator: torch.Generator) -> list[str]:
        return captions  # trained with the captions as they are

    def kept_words(self) -> list[str]:
        return []  # no word of its own that a caption must keep

    def on_step_end(self, step: int) -> bool:
        stop = self.options.text_encoder_steps
        if stop is None or step < stop or self.text_encoders_stopped:
            return False
        for name in set(self.modules) & set(self.parts.text_encoder_names):
            # no gradient from here on, so the optimizer leaves it as it is
            self.modules[name].requires_grad_(False)
        self.text_encoders_stopped = True
        return True

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every trained weight whole. When FSDP has sharded a module, every process must call this (gathering is
        collective), and the gathered weights are what `save` then writes."""
        gathered = {name: full_state_dict(module) for name, module in self.modules.items()}
        self.gathered = {name: state for name, state in gathered.items() if is_sharded(self.modules[name])}
        return {f"{name}.{key}": value for name, state in gathered.items() for key, value in state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, module in self.modules.items():
            prefix = f"{name}."
            load_full_state_dict(module, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

    def save(self, output_dir: Path, metadata: dict[str, str]) -> Path:
        """A diffusers pipeline folder, written beside its final name and renamed into place."""
        final = Path(output_dir) / PIPELINE_DIR
        # a sharded module is written from the weights state_dict() gathered on every process just before
        modules = {name: unsharded_copy(module, self.gathered[name]) if name in self.gathered else module
                   for name, module in self.modules.items()}
        pipeline = self.family.pipeline(self.parts.with_modules(modules))
        # training is over: casting in place spares a second copy of the weights in memory (torch's own cast:
        # diffusers' pipeline.to(dtype) prints a false "should be kept in float32: []" alarm, models/loading.py)
        for part in pipeline.components.values():
            if isinstance(part, torch.nn.Module):
                cast(part, SAVE_DTYPES[self.options.save_dtype])
        # not synced, as before: gigabytes of weights reach the disk in their own time at the end of the run
        with atomic_dir(final, durable=False) as tmp:
            pipeline.save_pretrained(tmp, safe_serialization=True)
            (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
            give_umask_permissions(tmp)
        return final
