"""LoRA and its variants (DoRA, LoHa, LoKr, OFT; finetune/strategies/lora_variants.py) through peft: adapter layers
in the denoiser's attention, optionally its convolutions (LoCon) and the text encoder."""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from finetune.export.lora import diffusers as diffusers_lora
from finetune.export.lora import layers as lora_layers
from finetune.export.lora.files import read_lora, write_lora_files
from finetune.export.lora.kohya import module_paths
from finetune.export.lora.kohya_names import FUSED_LAYOUTS, naming_for
from finetune.models.base import Components, ModelFamily, adaptable_text_encoders, unwrapped
from finetune.networks import peft_layers
from finetune.recipe.keys import key
from finetune.recipe.schema import StrategyOptions
from finetune.strategies import lora_presets, lora_variants
from finetune.strategies.base import held_in

log = logging.getLogger(__name__)


@dataclass
class Options(StrategyOptions):
    # peft's LoraConfig / LoHaConfig / LoKrConfig / OFTConfig; lora_variants.py says how rank and alpha map
    variant: Literal["lora", "loha", "lokr", "oft"] = key(
        "lora", "The adapter peft trains: `lora`, `loha` (LyCORIS's Hadamard product), `lokr` (Kronecker product) or "
        "`oft` (a learned rotation of each layer's input). With `oft`, `rank` is the block size and there is no alpha.")
    rank: int = key(4, "The adapter's rank: the inner width of each pair of low-rank matrices (higher learns more, "
                       "in a larger file). With variant `oft`, the block size.", minimum=1)
    alpha: Optional[float] = key(None, "Scales the adapter's update by alpha / rank; null: equal to rank (scale 1). "
                                       "Variant `oft` has none.", above=0)
    dropout: float = key(0.0, "Dropout on the adapted layers' inputs while training (variant `lora` only); 0: none.",
                         minimum=0, below=1)
    target_modules: list[str] = key(
        factory=list, help="The denoiser's layers to adapt, each matched against the end of a layer's name "
                           "(e.g. `to_q`, `attn1.to_k`); empty: the family's own list (SD's: `to_q`, `to_k`, "
                           "`to_v`, `to_out.0`; Flux's also has its MLPs).")
    target_preset: Optional[str] = key(
        None, "A named set of layers to adapt instead of `target_modules`, from the family's presets (Flux: "
              "`attention`, `attention_mlp`, `all_linear`); null: `target_modules`, or the family's default.")
    use_dora: bool = key(False, "DoRA (weight-decomposed LoRA): also learns each adapted layer's weight magnitude. "
                                "Variant `lora` only.")
    conv_layers: bool = key(False, "Also adapt the U-Net's ResNet and resampler convolutions (LoCon: 3x3 `conv1`/"
                                   "`conv2`, 1x1 `conv_shortcut`), at `conv_rank`. Not with variant `oft`.")
    conv_rank: Optional[int] = key(None, "The convolutions' rank (with `conv_layers`); null: `rank`.", minimum=1)
    conv_alpha: Optional[float] = key(None, "The convolutions' alpha (with `conv_layers`); null: the other layers' "
                                            "scale, alpha / rank, at `conv_rank`.", above=0)
    text_encoder: bool = key(False, "Also put LoRA on the text encoders: every one the family adapts (SDXL's two, as "
                                    "diffusers' `--train_text_encoder`). Set their own rank, learning rate and "
                                    "layers with the `text_encoder_*` keys.")
    text_encoder_rank: Optional[int] = key(None, "The text encoders' rank; null: `rank`.", minimum=1)
    text_encoder_learning_rate: Optional[float] = key(None, "The text encoders' learning rate; null: the denoiser's.",
                                                      above=0)
    text_encoder_target_modules: list[str] = key(
        factory=list, help="The text encoders' layers to adapt, matched as `target_modules`; empty: the family's "
                           "(their attention projections).")
    text_encoder_2: Optional[bool] = key(
        None, "SDXL's and SD3's second text encoder (CLIP-G) on its own: null follows `text_encoder`; false leaves it "
              "out; true adapts it, even without the first.")
    text_encoder_2_rank: Optional[int] = key(None, "The second text encoder's rank; null: `text_encoder_rank`, or "
                                                   "`rank`.", minimum=1)
    text_encoder_2_learning_rate: Optional[float] = key(
        None, "The second text encoder's learning rate; null: `text_encoder_learning_rate`, or the denoiser's.",
        above=0)
    formats: list[Literal["diffusers", "kohya", "comfyui"]] = key(
        factory=lambda: ["diffusers"],
        help="The files to write: the diffusers-layout file always; `kohya` adds `output_dir/kohya/<output_dir "
             "name>.safetensors` (AUTOMATIC1111, ComfyUI, Forge); `comfyui` adds ComfyUI's layout in "
             "`output_dir/comfyui/`. Each only on the families and variants that have that layout.")
    initial_weights: Optional[str] = key(
        None, "Start from a LoRA file (diffusers or kohya format): its layers, ranks and alphas replace `rank`, "
              "`alpha` and `target_modules`, and training starts from its weights. Plain LoRA only.", path=True)

    def changes_text_encoding(self) -> Optional[str]:
        if self.text_encoder or self.text_encoder_2:
            return "strategy.text_encoder is true, so the text encoder trains"
        return None

    def validate(self, recipe: Any) -> list[str]:
        problems = []  # a key's own bounds are declared on it (finetune/recipe/keys.py)
        if not (self.text_encoder or self.text_encoder_2) and (
                self.text_encoder_learning_rate is not None or self.text_encoder_rank
                or self.text_encoder_target_modules):
            problems.append("strategy.text_encoder_*: set, but strategy.text_encoder is false; "
                            "set strategy.text_encoder: true or remove them")
        if not self.adapts_text_encoder_2() and (self.text_encoder_2_rank or self.text_encoder_2_learning_rate):
            problems.append("strategy.text_encoder_2_*: set, but the second text encoder gets no LoRA; set "
                            "strategy.text_encoder_2: true (or strategy.text_encoder: true) or remove them")
        problems += lora_presets.preset_problems(self.target_preset, self.target_modules, recipe)
        return problems + lora_variants.problems(self) + self._file_problems()

    def adapts_text_encoder_2(self) -> bool:
        return self.text_encoder if self.text_encoder_2 is None else self.text_encoder_2

    def text_encoder_settings(self, names: tuple[str, ...]) -> dict[str, tuple[int, Optional[float]]]:
        """{text encoder name: (rank, learning rate or None for the U-Net's)} for the encoders that get LoRA, of
        the family's adaptable `names` (its spec's adapted_text_encoders): the part the family names
        `text_encoder_2` (SDXL's and SD3's CLIP-G) takes the text_encoder_2_* keys, every other the text_encoder_*
        ones."""
        first = (self.text_encoder_rank or self.rank, self.text_encoder_learning_rate)
        chosen = {}
        for name in names:
            if name == "text_encoder_2":
                if self.adapts_text_encoder_2():
                    chosen[name] = (self.text_encoder_2_rank or first[0],
                                    self.text_encoder_2_learning_rate or first[1])
            elif self.text_encoder:
                chosen[name] = first
        return chosen

    def _file_problems(self) -> list[str]:
        problems = []
        if "comfyui" in self.formats and (self.variant != "lora" or self.use_dora):
            problems.append("strategy.formats: ComfyUI's diffusion_model. layout holds plain LoRA here (no LoHa, LoKr, "
                            "OFT or DoRA); remove comfyui (the diffusers-layout file loads with finetune.load_adapter)")
        if "kohya" in self.formats and (self.variant == "oft" or self.use_dora):
            problems.append(f"strategy.formats: kohya's format (and LyCORIS's, for LoHa and LoKr) holds no "
                            f"{'DoRA' if self.use_dora else 'OFT'} here; remove kohya (the diffusers-layout file "
                            "loads with finetune.load_adapter)")
        if self.initial_weights:
            if self.variant != "lora" or self.use_dora:
                problems.append("strategy.initial_weights: starting from a file works for plain LoRA only; remove "
                                "it, or set strategy.variant: lora without strategy.use_dora")
            if self.target_modules or self.conv_layers or self.target_preset:
                problems.append("strategy.initial_weights: the file decides which layers train; remove "
                                "strategy.target_modules / target_preset / conv_layers")
            if not self.initial_weights.endswith(".safetensors") or not os.path.isfile(self.initial_weights):
                problems.append(f"strategy.initial_weights: {self.initial_weights} is not a .safetensors file; give "
                                "the path of a LoRA file (diffusers or kohya format)")
            else:
                problems += _damaged(self.initial_weights)
        return problems


def _damaged(path: str) -> list[str]:
    """strategy.initial_weights cut short or damaged, found from its header before any model loads."""
    from finetune.io.safetensors_io import read_header
    from finetune.file_errors import FileProblem

    try:
        read_header(path, "file")
    except FileProblem as exc:
        return [f"strategy.initial_weights: {exc}"]
    return []


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
