"""LoRA's recipe keys (`strategy.kind: lora`, and its variants' keys) and the checks on them that need no model;
the strategy itself is in finetune/strategies/lora.py."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal, Optional

from finetune.recipe.keys import key
from finetune.recipe.schema import StrategyOptions
from finetune.strategies import lora_presets, lora_variants


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
