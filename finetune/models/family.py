"""A model family in two halves, both in the family's own file (finetune/models/<family>.py):

- `FamilySpec`, what the family *is*, declared: its name, its diffusers pipeline and how a base is recognised as
  one, its objective and recipe options (`model.*` when `model.family` names it), its LoRA targets and presets,
  where hypernetworks attach, its file naming (kohya prefixes, embedding keys) and its tiny offline build;
- a `Family` subclass, what it *does* differently: `encode_prompts`, `predict`, `caption_window`, and latents in
  and out where its VAE differs, written from the shared helpers beside this file (never by inheriting another
  family). Loading the base and building the pipeline are done here once, for every family.

The spec's fields are read through the family object (`family.lora_targets`), so the loop, strategies and file
formats need nothing but the object `finetune.models.family_for` returns. Registered in
`finetune.models.FAMILY_MODULES`.
"""
from __future__ import annotations

import inspect
import json
import os
import sys
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Mapping, Optional

import torch

from finetune.models.base import Components, unwrapped
from finetune.models.device_constants import on_device
from finetune.models.loading import load_frozen


@dataclass(frozen=True)
class OriginalNames:
    """How the model's original code names the denoiser's modules where diffusers names them otherwise: the
    layout ComfyUI reads LoRAs in (`prefix` + original module path; finetune/export/lora/comfyui.py). Per block
    list (diffusers' name -> the original's, `blocks`): one-to-one renames of a block's modules (`renamed`), and
    modules the original fuses, each with its diffusers members in the order their outputs are stacked
    (`fused`); `top`: modules outside the blocks. With no `blocks`, every module keeps its diffusers path
    (Qwen-Image's original names are diffusers')."""
    prefix: str = "diffusion_model."
    blocks: Mapping[str, str] = field(default_factory=dict)  # "transformer_blocks" -> "double_blocks"
    renamed: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # list -> {diffusers tail: original}
    fused: Mapping[str, Mapping[str, tuple[str, ...]]] = field(default_factory=dict)  # list -> {original: members}
    top: Mapping[str, str] = field(default_factory=dict)  # diffusers module path -> original path
    # a fused member's output width relative to the fused module's input width, where it is not 1 (q/k/v's
    # outputs are as wide as the block's input; Flux's single-block proj_mlp is 4 times wider)
    widths: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class FamilySpec:
    name: str  # model.family's value
    title: str  # how messages and the README name it ("Flux.1")
    pipeline: str  # the diffusers pipeline class that loads and samples it ("FluxPipeline")
    objective: str  # "ddpm" (finetune/models/ddpm.py) or "flow_matching" (flow_matching.py)
    options: type  # the recipe's `model` section for this family: ModelOptions + the family's own keys
    behaviour: type  # the Family subclass written in the family's file
    tiny: Callable[[int], Any]  # seed -> a tiny random pipeline of the same classes, built offline
    # other model_index.json `_class_name`s of this family's bases (img2img, inpaint pipelines)
    also_recognised: tuple[str, ...] = ()
    # a single checkpoint's signature: key prefixes it holds, every one (a `model.diffusion_model.` prefix,
    # ComfyUI's and SD's, is stripped first); where several families' match, the longest signature wins (SDXL's
    # file also holds SD's U-Net keys, Flux.2's Flux.1's); empty: not told from a single file
    single_file_keys: tuple[str, ...] = ()
    lora_targets: tuple[str, ...] = ()  # default LoRA target modules in the denoiser (peft name tails)
    # strategy.target_preset's named sets: preset -> module-path patterns matched whole (lora_presets.py)
    lora_target_presets: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    conv_lora_targets: tuple[str, ...] = ()  # the denoiser's convolutions strategy.conv_layers adds
    text_encoder_lora_targets: tuple[str, ...] = ()
    # the text encoders textual inversion and text-encoder LoRA change, in the pipeline's order (None: all)
    adapted_text_encoders: Optional[tuple[str, ...]] = None
    # where a hypernetwork acts (finetune/networks/hypernetwork_points.py): None, a U-Net's cross-attention
    # context (A1111's design); or a TextStream naming the attention layers whose keys/values read text alone
    hypernetwork_text_stream: Any = None
    # strategy kind (or "kind.option", an option of it that is set) -> why it is not trained on this family: refused
    # by name before any model loads
    refuses: Mapping[str, str] = field(default_factory=dict)
    # kohya's naming: LoRA prefix per part, the denoiser's module layout (export/lora/kohya_names.py LAYOUTS:
    # "diffusers", "sgm", "bfl" (Flux's), "mmdit" (SD3's) or "none"), and ss_base_model_version (None: told
    # from the weights)
    kohya_prefixes: Mapping[str, str] = field(default_factory=dict)
    kohya_unet_layout: str = "none"
    kohya_base_model_version: Optional[str] = None
    # the embedding file's key per text encoder (SDXL: clip_l, clip_g; empty: one encoder, keyed by the token)
    embedding_keys: Mapping[str, str] = field(default_factory=dict)
    # the layout ComfyUI reads this family's LoRAs in, written by strategy.formats: [comfyui] (None: not written;
    # the diffusers-layout `transformer.` file is then the one to load)
    comfyui_names: Optional[OriginalNames] = None
    # ModelSpec's `modelspec.architecture` and `.implementation` (what Forge tells the base by;
    # export/family_header.py; None: kohya's SD versions' ids, and diffusers' repository), and the kohya trainer
    # module its files name (`ss_network_module`; None: networks.lora)
    modelspec_architecture: Optional[str] = None
    modelspec_implementation: Optional[str] = None
    kohya_network_module: Optional[str] = None
    # the original single-checkpoint layout finetune writes the whole model in (`finetune merge --out x.safetensors`;
    # export/single_file_writers.py: "ldm", SD 1.x/2.x's CompVis layout, or "sgm", SDXL's); None: none written
    single_file_layout: Optional[str] = None
    # the released U-Net's layout (its config's block-shaping values), for reading kohya files without the base
    released_unet_config: Optional[Mapping[str, Any]] = None
    long_prompts: bool = False  # data.max_token_length's 75-token chunking applies (CLIP-only families)
    # what the objective does by default, and where that comes from (the peers, diffusers' script): the README's
    # family table prints it
    objective_defaults: str = ""
    pipeline_kwargs: Mapping[str, Any] = field(default_factory=dict)  # given when the pipeline is built
    # model_index.json keys the pipeline's constructor takes (Krea 2's tapped text layers): read from the base when
    # it loads and given to every pipeline built on its parts, where they would otherwise take the defaults
    pipeline_settings: tuple[str, ...] = ()
    # class names of the denoiser's repeated blocks `train.compile: blocks` compiles (training/compile.py); empty:
    # the denoiser's own `_repeated_blocks` (diffusers sets it on most transformers)
    compile_blocks: tuple[str, ...] = ()
    # class names of the denoiser's transformer blocks `train.offload` streams from the CPU
    # (training/block_offload.py); None: compile_blocks, else the denoiser's `_repeated_blocks`; (): none (a U-Net,
    # refused by name)
    offload_blocks: Optional[tuple[str, ...]] = None
    # importable modules the family needs beyond finetune's own dependencies -> what for; checked by importing
    # them before any model loads (a torchvision built for another torch is found but does not import)
    needs: Mapping[str, str] = field(default_factory=dict)
    # edit models: how many control (reference) images a sample may carry (`data.control`, finetune/data/control.py),
    # each reaching `predict` as `conditions["control_latents"]`; 0: the family takes none (data.control refused)
    control_images: int = 0


def refusal(spec: FamilySpec, strategy: Any) -> str | None:
    """The message refusing the recipe's strategy section (`strategy.kind`, and its options) on the family, or
    None when the family trains it: `spec.refuses` names a kind ("textual_inversion"), or a kind's option that is
    set ("lora.text_encoder")."""
    for key, reason in spec.refuses.items():
        kind, _, option = key.partition(".")
        if kind != strategy.kind or (option and not getattr(strategy, option, False)):
            continue
        if option:
            return (f"strategy.{option}: {kind.replace('_', ' ')} on {spec.name} with {option} is not written yet "
                    f"({reason}); remove it")
        return f"strategy.kind: {kind.replace('_', ' ')} on {spec.name} is not written yet ({reason}); use lora"
    return None


def base_config(base: str, name: str = "model_index.json") -> dict[str, Any]:
    """A base's `name` (model_index.json, transformer/config.json) from its local pipeline folder, or a hub id's
    from the local hub cache (nothing is downloaded); {} when there is none. For what a family reads of a base
    before loading it (its variant: Flux.2 dev or klein; a guidance embedding)."""
    path = os.path.join(os.path.expanduser(base), name)
    try:
        if not os.path.exists(path) and base.count("/") == 1:
            from huggingface_hub import try_to_load_from_cache

            path = try_to_load_from_cache(base, name) or path
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError, TypeError):
        return {}


class Family:
    """The shared behaviour of every family; a family's file subclasses it for what it does differently."""

    def __init__(self, spec: FamilySpec | None = None):
        # StableDiffusion() alone (or a test's subclass of it): the spec its family's file declares
        self.spec = spec if spec is not None else next(
            sys.modules[cls.__module__].SPEC for cls in type(self).__mro__
            if hasattr(sys.modules.get(cls.__module__), "SPEC"))

    def __getattr__(self, name: str) -> Any:
        # family.lora_targets, family.name, ...: the spec's declared fields
        if name != "spec" and not name.startswith("__"):
            return getattr(self.spec, name)
        raise AttributeError(name)

    def __repr__(self) -> str:
        return f"<{self.spec.title} family ({self.spec.name})>"

    # --- loading and the pipeline: once, for every family -----------------------------------------------------
    def load(self, base: str, *, revision: str | None = None, variant: str | None = None,
             dtype: torch.dtype = torch.float32, config: str | None = None, vae: str | None = None,
             options: Any = None) -> Components:
        """The frozen base (every part requires_grad False, eval mode) from a hub id, a diffusers folder or a
        single checkpoint (`config`: a folder or hub id with its configs); `vae` replaces its VAE; `options`: the
        recipe's `model` section (None: the family's defaults). Raises ModelLoadError naming the fix."""
        options = options if options is not None else self.spec.options()
        name = self.pipeline_name(base)
        parts = load_frozen(self.pipeline_class(name), base, revision=revision, variant=variant, dtype=dtype,
                            config=config, vae=vae, extra_kwargs=self.load_kwargs(base, options),
                            ddpm=self.spec.objective == "ddpm")
        parts.options = options
        parts.extra["pipeline"] = name
        index = base_config(config or base) if self.spec.pipeline_settings else {}
        parts.extra["pipeline_settings"] = {key: index[key] for key in self.spec.pipeline_settings if key in index}
        return parts

    def pipeline_name(self, base: str) -> str:
        """The diffusers pipeline class that loads `base`: the spec's (a family whose variants load with their
        own class, Flux.2 klein's, says which from the base)."""
        return self.spec.pipeline

    def load_kwargs(self, base: str, options: Any) -> dict[str, Any]:
        """What the pipeline's loaders are given besides the weights (a part given as None is not loaded); none
        unless the family's file says (SD's safety checker left out, SD3's T5 on request)."""
        return {}

    def pipeline_class(self, name: str | None = None) -> Any:
        import diffusers

        return getattr(diffusers, name or self.spec.pipeline)

    def pipeline(self, parts: Components, unwrap: Any = None) -> Any:
        """A diffusers inference pipeline sharing the (possibly adapted) parts, each given by the name the
        pipeline's constructor takes it by; `unwrap` strips distributed wrappers."""
        unwrap = unwrap or unwrapped
        cls = self.pipeline_class(parts.extra.get("pipeline"))
        given: dict[str, Any] = {}
        for name in inspect.signature(cls.__init__).parameters:
            if name in parts.modules:
                given[name] = unwrap(parts.modules[name])
            elif name in parts.tokenizers:
                given[name] = parts.tokenizers[name]
            elif name == "scheduler":
                given[name] = parts.extra["sampling_scheduler"]
            elif name in parts.extra.get("pipeline_settings", {}):
                given[name] = parts.extra["pipeline_settings"][name]
            elif name in self.spec.pipeline_kwargs:
                given[name] = self.spec.pipeline_kwargs[name]
            elif name.startswith(("text_encoder", "tokenizer", "image_encoder", "feature_extractor", "safety")):
                given[name] = None  # an optional part left out (SD3 without T5)
        return cls(**given)

    # --- the objective ----------------------------------------------------------------------------------------
    def objective(self, parts: Components, options: Any = None) -> Any:
        """How latents are noised and what is regressed (finetune/models/ddpm.py, flow_matching.py), from the
        recipe's `model` options (None: the family's defaults)."""
        options = options if options is not None else (getattr(parts, "options", None) or self.spec.options())
        if self.spec.objective == "ddpm":
            from finetune.models.ddpm import DDPMObjective

            scheduler = parts.noise_scheduler
            return DDPMObjective(scheduler, options.prediction_type or scheduler.config.prediction_type,
                                 options.noise_offset, options.min_snr_gamma)
        from finetune.models.flow_matching import from_recipe

        flow = vars(options.flow)
        config = parts.extra["sampling_scheduler"].config
        return from_recipe(flow, self.flow_defaults(flow, config), config)

    def flow_defaults(self, flow: dict[str, Any], scheduler_config: Any) -> dict[str, Any]:
        """The family's sigma sampling where `model.flow` says auto / None (a flow-matching family's file says)."""
        raise NotImplementedError(f"{self.spec.name} declares flow matching but no flow_defaults")

    # --- text -------------------------------------------------------------------------------------------------
    def text_encoders(self, parts: Components) -> list[tuple[str, Any, Any]]:
        """(part name, tokenizer, unwrapped text encoder) per adaptable text encoder, in the pipeline's order."""
        chosen = self.spec.adapted_text_encoders
        names = [n for n in parts.text_encoder_names if chosen is None or n in chosen]
        return [(name, parts.tokenizers["tokenizer" + name.removeprefix("text_encoder")],
                 unwrapped(parts.modules[name])) for name in names]

    def text_device(self, parts: Components) -> torch.device:
        """Where prompts are encoded: the first text encoder's device (the denoiser may not be on it yet: the
        loop moves it after the caches)."""
        return next(unwrapped(parts.modules[parts.text_encoder_names[0]]).parameters()).device

    def tokenizer_of(self, base: str) -> Any | None:
        """The first tokenizer without the models (`finetune validate`), of the class model_index.json names,
        from a diffusers folder; None for a hub id or a single file (its tokenizer comes with loading)."""
        import transformers

        folder = os.path.join(os.path.expanduser(base), "tokenizer")
        index = os.path.join(os.path.expanduser(base), "model_index.json")
        if not os.path.isdir(folder):
            return None
        try:
            with open(index, encoding="utf-8") as handle:
                class_name = json.load(handle).get("tokenizer", [None, None])[1]
        except (OSError, ValueError):
            class_name = None
        return getattr(transformers, class_name or "AutoTokenizer", transformers.AutoTokenizer).from_pretrained(folder)

    def caption_window(self, tokenizer: Any, max_token_length: int | None) -> int:
        """Tokens of caption text that reach the text encoder."""
        return tokenizer.model_max_length

    # --- images -----------------------------------------------------------------------------------------------
    def encode_images(self, parts: Components, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Latents for pixels [batch, 3, H, W] in [-1, 1], as the denoiser takes them."""
        return self.latents_from_moments(parts, *self.encode_image_moments(parts, pixels), generator)

    def encode_image_moments(self, parts: Components, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's latent distribution (mean, std) for the images: what a latent cache keeps."""
        vae = parts.vae
        distribution = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        return distribution.mean, distribution.std

    def latents_from_moments(self, parts: Components, mean: torch.Tensor, std: torch.Tensor,
                             generator: torch.Generator) -> torch.Tensor:
        """One latent drawn from (mean, std), the draw diffusers' `latent_dist.sample` makes, then normalised as the
        VAE's config says: per channel, `(z - latents_mean) / latents_std`, where it lists them (the Wan-type VAEs
        of Qwen-Image, Krea 2 and Qwen-Image 2.1), else `(z - shift_factor) x scaling_factor` (no shift for SD's)."""
        from diffusers.utils.torch_utils import randn_tensor

        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        config = parts.vae.config
        if config.get("latents_mean") is not None:
            shift, std_of = (on_device((name, tuple(config[name])), partial(_per_channel, config[name]), mean.device)
                             for name in ("latents_mean", "latents_std"))  # made once per device
            scale = 1.0 / std_of
            return ((mean + std * noise).float() - shift) * scale
        return ((mean + std * noise).float() - (config.get("shift_factor") or 0.0)) * config.scaling_factor

    def control_latents(self, parts: Components, mean: torch.Tensor) -> torch.Tensor:
        """The latents of control images [batch, c, h, w] from their VAE means, as edit pipelines make them: the
        distribution's mode (FluxKontextPipeline's `sample_mode="argmax"`), normalised as training latents are."""
        generator = torch.Generator(mean.device).manual_seed(0)  # drawn against a zero std: the mean itself
        return self.latents_from_moments(parts, mean, torch.zeros_like(mean), generator)

    def sample_kwargs(self, control_images: list[Any], width: int, height: int,
                      pipeline: Any = None) -> dict[str, Any]:
        """What the `pipeline`'s __call__ takes besides the prompt for a width x height sample given
        `control_images` (PIL images, one per control slot; `sample.prompts`' control_image): nothing for a
        family without control images. An edit family's file says how its pipeline takes them. ValueError
        naming the family when one that takes none is given some."""
        if control_images:
            raise ValueError(f"control_image: {self.spec.title} ({self.spec.name}) is no edit model and takes no "
                             "control image; remove control_image, or sample an edit model's base")
        return {}

    # --- what each family writes itself ---------------------------------------------------------------------
    def encode_prompts(self, parts: Components, captions: list[str]) -> Any:
        """The text conditioning for captions: a tensor, or a tuple of tensors, each with the batch first; what
        the text cache keeps per caption."""
        raise NotImplementedError

    def predict(self, parts: Components, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: Any,
                conditions: dict[str, torch.Tensor]) -> torch.Tensor:
        """The denoiser's output for `noisy` latents [batch, c, h, w] at `timesteps`, shaped like them, given the
        prompts' `conditioning` and each image's `conditions` (sizes, crop corners: finetune/data/dataset.py; for
        an edit family, `control_latents`: a list with one [batch, c, h_i, w_i] tensor per control image slot, from
        `control_latents` above)."""
        raise NotImplementedError



def _per_channel(values) -> torch.Tensor:
    """[1, channels, 1, 1] on the host."""
    return torch.tensor(list(values)).view(1, -1, 1, 1)
