"""LoRA and its variants (DoRA, LoHa, LoKr, OFT; finetune/strategies/lora_variants.py) through peft: adapter layers
in the denoiser's attention, optionally its convolutions (LoCon) and the text encoder."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Optional

import torch

from finetune.export.lora import diffusers as diffusers_lora
from finetune.export.lora import layers as lora_layers
from finetune.export.lora.files import read_lora, write_lora_files
from finetune.export.lora.kohya import module_paths
from finetune.export.lora.kohya_names import FUSED_LAYOUTS, naming_for
from finetune.models.base import Components, ModelFamily, adaptable_text_encoders, unwrapped
from finetune.networks import peft_layers
from finetune.strategies import lora_presets, lora_variants
from finetune.strategies.base import held_in
from finetune.strategies.lora_options import Options  # noqa: F401  (the registry reads lora.Options)

log = logging.getLogger(__name__)


class Strategy:
    artifact_name = diffusers_lora.FILE_NAME

    def __init__(self, options: Options):
        self.options = options
        self.modules: dict[str, torch.nn.Module] = {}  # component name -> module holding LoRA layers
        self.configs: dict[str, Any] = {}
        self.start: Optional[lora_layers.LoraWeights] = None  # strategy.initial_weights, read by check()
        self.learning_rates: dict[str, Optional[float]] = {}  # text encoder -> its own rate

    def check(self, family: ModelFamily, parts: Components) -> None:
        from finetune.strategies.base import StrategySetupError

        if "comfyui" in self.options.formats and family.comfyui_names is None:
            raise StrategySetupError(f"strategy.formats: no ComfyUI layout is written for {family.name} here; "
                                     "remove comfyui (ComfyUI reads the diffusers-layout file for this family)")
        if "kohya" in self.options.formats and family.kohya_unet_layout == "none":
            raise StrategySetupError(f"strategy.formats: kohya's layout is not written for {family.name} here; "
                                     "remove kohya (the diffusers-layout file loads in diffusers and ComfyUI)")
        if "kohya" in self.options.formats and self.options.variant != "lora" and \
                family.kohya_unet_layout in FUSED_LAYOUTS:  # LyCORIS's names: fused modules
            layout = FUSED_LAYOUTS[family.kohya_unet_layout]
            raise StrategySetupError(f"strategy.formats: kohya's {layout} layout fuses q/k/v, and a "
                                     f"{self.options.variant} "
                                     "of each does not fuse into one; remove kohya (finetune.load_adapter reads the "
                                     "peft-adapter file)")
        if self.options.target_preset and lora_presets.refusal(family, self.options.target_preset):
            raise StrategySetupError(lora_presets.refusal(family, self.options.target_preset)[0])
        if self.options.text_encoder_2 and len(parts.text_encoder_names) < 2:
            raise StrategySetupError(f"strategy.text_encoder_2: this model has one text encoder "
                                     f"({family.name}); remove text_encoder_2 (text_encoder: true adapts it)")
        if self.options.text_encoder_2 and "text_encoder_2" not in adaptable_text_encoders(family, parts):
            raise StrategySetupError(f"strategy.text_encoder_2: {family.name}'s LoRA adapts "
                                     f"{', '.join(adaptable_text_encoders(family, parts)) or 'no text encoder'}, "
                                     "not its text_encoder_2; remove text_encoder_2")
        adapted = set(self.options.text_encoder_settings(adaptable_text_encoders(family, parts)))
        loadable = getattr(family.pipeline(parts), "_lora_loadable_modules", None)
        if loadable is not None and adapted - set(loadable):
            log.warning("strategy.text_encoder: %s's own load_lora_weights reads only %s, so it would drop the %s "
                        "layers of this file (finetune.load_adapter reads them)", family.name, ", ".join(loadable),
                        ", ".join(sorted(adapted - set(loadable))))
        if self.options.variant == "oft":
            lora_variants.refuse_oft_on_convolutions(self.options.target_modules or family.lora_targets,
                                                     parts.denoiser)
        if self.options.initial_weights:
            adapted = set(self.options.text_encoder_settings(adaptable_text_encoders(family, parts)))
            self.start = initial_layers(self.options.initial_weights, parts, adapted)

    def prepare(self, family: ModelFamily, parts: Components, keep_frozen_base: bool = False) -> None:
        # keep_frozen_base needs nothing: switching the adapters off gives the base back
        o = self.options
        self.kohya_naming = naming_for(family, unwrapped(parts.denoiser).config)  # the family's names in kohya files
        self.comfyui_names = family.comfyui_names  # and in ComfyUI's layout (None: not written)
        self.configs[parts.denoiser_name] = lora_variants.peft_config(
            o.variant, rank=o.rank, alpha=o.alpha, dropout=o.dropout, use_dora=o.use_dora,
            targets=o.target_modules or lora_presets.targets(family, o.target_preset, unwrapped(parts.denoiser)),
            conv_targets=family.conv_lora_targets if o.conv_layers else (), conv_rank=o.conv_rank,
            conv_alpha=o.conv_alpha)
        self.modules[parts.denoiser_name] = parts.denoiser
        for name, (rank, learning_rate) in o.text_encoder_settings(adaptable_text_encoders(family, parts)).items():
            self.configs[name] = lora_variants.peft_config(
                o.variant, rank=rank, alpha=o.alpha, dropout=o.dropout, use_dora=o.use_dora,
                targets=o.text_encoder_target_modules or family.text_encoder_lora_targets)
            self.modules[name] = parts.modules[name]
            self.learning_rates[name] = learning_rate
        from peft import LoraConfig

        start = self.start.layers if self.start is not None else {}
        for name in start:  # the file's layers, ranks and alphas, exactly
            self.configs[name] = LoraConfig(**{**lora_layers.peft_config(start[name]), "lora_dropout": o.dropout})
        for name, module in self.modules.items():
            peft_layers.inject(module, self.configs[name])
            for parameter in self._trainable(module):
                # trainable weights stay fp32 whatever the frozen base's dtype (no fp16 unscale errors)
                parameter.data = parameter.data.float()
            if name in start:
                self._load_component(name, lora_layers.peft_state_dict(start[name]))

    @staticmethod
    def _trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
        # what peft's adapter layers added (lora_A/B, DoRA's magnitude, hada_*, lokr_*, oft_R); the base is frozen
        return [p for n, p in module.named_parameters() if lora_variants.is_adapter_parameter(n) and p.requires_grad]

    def parameter_groups(self, learning_rate: float) -> list[dict[str, Any]]:
        # the denoiser first, then each text encoder with its own rate (None: the denoiser's)
        return [{"params": self._trainable(module), "lr": self.learning_rates.get(name) or learning_rate}
                for name, module in self.modules.items()]

    @contextlib.contextmanager
    def frozen_base(self, parts: Components):
        for module in self.modules.values():
            peft_layers.enable(module, False)
        try:
            yield parts.with_modules(self.modules)
        finally:
            for module in self.modules.values():
                peft_layers.enable(module, True)

    def as_loaded(self, dtype: torch.dtype):
        # peft builds a loaded adapter's layers in their base layer's dtype (finetune.load_adapter, and diffusers'
        # load_lora_weights, inject through peft.functional, which casts no adapter up to fp32)
        return held_in(self.modules.values(), dtype, keep=lora_variants.is_adapter_parameter)

    def prompts(self, captions: list[str], generator: torch.Generator) -> list[str]:
        return captions  # trained with the captions as they are

    def kept_words(self) -> list[str]:
        return []  # no word of its own that a caption must keep

    def on_step_end(self, step: int) -> bool:
        return False  # what trains never changes

    def state_dict(self) -> dict[str, torch.Tensor]:
        return diffusers_lora.pack({name: peft_layers.state_dict(module) for name, module in self.modules.items()})

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, part in diffusers_lora.unpack(state).items():
            self._load_component(name, part)

    def _load_component(self, name: str, state: dict[str, torch.Tensor]) -> None:
        result = peft_layers.load_state_dict(self.modules[name], state)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ValueError(f"LoRA state for {name} has keys this model lacks: {unexpected[:3]}")

    def save(self, output_dir: Path, metadata: dict[str, str]) -> Path:
        o = self.options
        meta = {**metadata, lora_layers.VARIANT_KEY: o.variant, "finetune.rank": str(o.rank),
                "finetune.use_dora": str(o.use_dora).lower()}
        if o.variant != "oft":
            meta["finetune.alpha"] = str(o.alpha or o.rank)
        configs = {name: config.to_dict() for name, config in self.configs.items()}
        components = diffusers_lora.unpack(self.state_dict())
        # which files strategy.formats means for this variant, and their layouts, are the export code's
        return write_lora_files(output_dir, components, configs, meta, o.variant, o.formats, self.kohya_naming,
                                self.comfyui_names)


def initial_layers(path: str, parts: Components, text_encoders: set[str]) -> lora_layers.LoraWeights:
    """A LoRA file's layers, named as this model names its modules; refused (before any long work) when they do
    not fit the model or the recipe."""
    from finetune.strategies.base import StrategySetupError

    try:
        start = read_lora(path, module_paths(parts))
    except lora_layers.LoraFileError as exc:
        raise StrategySetupError(f"strategy.initial_weights: {exc}") from None
    if start.uses_dora:
        raise StrategySetupError(f"strategy.initial_weights: {path} is a DoRA file; start from a plain LoRA file")
    missing = sorted(set(start.layers) & set(parts.text_encoder_names) - text_encoders)
    if missing:
        raise StrategySetupError(f"strategy.initial_weights: {path} also adapts {', '.join(missing)}; set "
                                 f"strategy.text_encoder: true to go on training {'them' if len(missing) > 1 else 'it'}")
    for component, module, layer in start.modules():
        weight = parts.modules[component].get_submodule(module).weight
        shape = (weight.shape[0], *layer.down.shape[1:])
        if layer.up.shape[0] != weight.shape[0] or tuple(layer.down.shape[1:]) != tuple(weight.shape[1:]):
            raise StrategySetupError(f"strategy.initial_weights: {component}.{module} is {tuple(weight.shape)} in "
                                     f"this model but {shape} in {path}: the file was made for another base model")
    return start
