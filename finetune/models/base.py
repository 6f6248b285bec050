"""What the loop and strategies need from a model family, so that neither asks which family it runs on."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


class ModelLoadError(RuntimeError):
    """The base model could not be loaded; the message says why and what to do."""


# how diffusers pipelines name their parts (and so the key prefixes of LoRA files): the denoiser is `unet` or
# `transformer`; text encoders are `text_encoder`, `text_encoder_2`, ... with `tokenizer`, `tokenizer_2`, ...
DENOISER_NAMES = ("unet", "transformer")


@dataclass
class Components:
    """The loaded base, its parts named as the diffusers pipeline names them. A trained part may be replaced by
    a distributed wrapper during training (`modules[name] = accelerator.prepare(...)`)."""

    modules: dict[str, Any]  # every torch module: "vae", "text_encoder", ..., and the denoiser
    # "tokenizer", "tokenizer_2", ...: the i-th belongs to the i-th text encoder; a pipeline's "processor" (a
    # Qwen3-VL processor, which holds its tokenizer) is kept here too, so that pipelines built on the parts get it
    tokenizers: dict[str, Any]
    denoiser_name: str  # which module predicts: "unet" or "transformer"
    text_encoder_names: tuple[str, ...]  # in the pipeline's order ("text_encoder", "text_encoder_2")
    noise_scheduler: Any  # a training scheduler with the base's noise schedule
    source: str  # what model.base said, for metadata
    extra: dict[str, Any] = field(default_factory=dict)  # family-specific values (e.g. the sampling scheduler)
    # data.max_token_length: captions encoded whole up to this many tokens (kohya/A1111 long prompts); None: the
    # text encoder's own window. Training, its caches and sample grids all read it from here
    max_token_length: int | None = None
    # the recipe's `model` section (the family's options class: model.guidance, model.flow, ...), set by loading
    options: Any = None

    @property
    def denoiser(self) -> Any:
        return self.modules[self.denoiser_name]

    @property
    def vae(self) -> Any:
        return self.modules["vae"]

    def text_encoder_modules(self) -> dict[str, Any]:
        """{name: text encoder}, in the pipeline's order."""
        return {name: self.modules[name] for name in self.text_encoder_names}

    def trained(self) -> list[str]:
        """Names of the modules with a parameter that trains."""
        return [name for name, module in self.modules.items()
                if any(p.requires_grad for p in module.parameters())]

    def enable_gradient_checkpointing(self, names: list[str]) -> None:
        """Recompute activations in backward for the denoiser (diffusers' switch) and for those of `names` that
        are text encoders (transformers' switch)."""
        self.denoiser.enable_gradient_checkpointing()
        for name in set(names) & set(self.text_encoder_names):
            encoder = self.modules[name]
            # transformers renamed the switch (the old name warns that v6 removes it); older releases lack the new
            getattr(encoder, "activation_checkpointing_enable", encoder.gradient_checkpointing_enable)()

    def with_modules(self, modules: dict[str, Any]) -> "Components":
        """A copy whose named modules are replaced (e.g. by frozen copies); the rest are shared."""
        return dataclasses.replace(self, modules={**self.modules, **modules})

    def __getattr__(self, name: str) -> Any:
        # parts.unet, parts.text_encoder_2, parts.tokenizer: for code that knows the family (its file, tests)
        if not name.startswith("__"):
            for table in ("modules", "tokenizers"):
                found = self.__dict__.get(table, {})
                if name in found:
                    return found[name]
        raise AttributeError(f"{type(self).__name__} has no attribute or part {name!r}")


def pipeline_components(pipe: Any, source: str, noise_scheduler: Any, extra: dict[str, Any] | None = None
                        ) -> Components:
    """Components from a diffusers pipeline, named as the pipeline names them (`pipe.components`)."""
    modules = {name: part for name, part in pipe.components.items() if isinstance(part, torch.nn.Module)}
    tokenizers = {name: part for name, part in pipe.components.items()
                  if name.startswith(("tokenizer", "processor")) and part is not None}
    denoiser = next(name for name in DENOISER_NAMES if name in modules)
    encoders = tuple(sorted((n for n in modules if n.startswith("text_encoder")), key=_numbered))
    return Components(modules, tokenizers, denoiser, encoders, noise_scheduler, source, extra or {})


def adaptable_modules(holder: Any) -> dict[str, Any]:
    """{name: module} of the parts adapters go into, the denoiser first and then the text encoders, of a diffusers
    pipeline or of Components (a wrapper the loop put around one is left on)."""
    found = holder.modules if isinstance(holder, Components) else {
        name: part for name, part in holder.components.items() if isinstance(part, torch.nn.Module)}
    names = [n for n in DENOISER_NAMES if n in found]
    names += sorted((n for n in found if n.startswith("text_encoder")), key=_numbered)
    return {name: found[name] for name in names}


def denoiser_of(holder: Any) -> Any:
    """The U-Net or transformer of a diffusers pipeline or of Components."""
    return next(iter(adaptable_modules(holder).values()))


def adaptable_text_encoders(family: Any, parts: Components) -> tuple[str, ...]:
    """The text encoders a strategy may train or extend, in the pipeline's order (the family's `text_encoders`:
    SD3's CLIPs, not its T5)."""
    return tuple(name for name, _, _ in family.text_encoders(parts))


def default_resolution(pipe: Any) -> int:
    """A pipeline's own image side in pixels: its denoiser's sample size (a U-Net's, SD3's) or the pipeline's
    default (Flux's) times the VAE's downsampling; 1024 when it says neither (Z-Image's pipeline default)."""
    size = getattr(denoiser_of(pipe).config, "sample_size", None) or getattr(pipe, "default_sample_size", None)
    return size * pipe.vae_scale_factor if size else 1024


def guidance_keyword(pipe: Any) -> str:
    """The `__call__` argument that scales classifier-free guidance: `guidance_scale`, or `true_cfg_scale` where
    guidance_scale defaults to None, a guidance-distilled model's embedded value only, or is not taken at all
    (Qwen-Image, Qwen-Image 2.1: real CFG with true_cfg_scale and a negative prompt)."""
    import inspect

    parameters = inspect.signature(pipe.__call__).parameters
    distilled_only = "guidance_scale" not in parameters or parameters["guidance_scale"].default is None
    return "true_cfg_scale" if distilled_only and "true_cfg_scale" in parameters else "guidance_scale"


def default_guidance(pipe: Any) -> float:
    """The guidance scale a pipeline uses when given none: its `__call__` default (SD 7.5, SDXL 5.0, SD3 7.0,
    Flux.1-dev 3.5, its embedded guidance; Z-Image 5.0; Qwen-Image's true_cfg_scale 4.0); 7.5 if it declares
    none."""
    import inspect

    parameter = inspect.signature(pipe.__call__).parameters.get(guidance_keyword(pipe))
    default = parameter.default if parameter is not None else inspect.Parameter.empty
    return float(default) if isinstance(default, (int, float)) else 7.5


def tokenizer_name(text_encoder_name: str) -> str:
    """A pipeline's tokenizer for a text encoder: `text_encoder` -> `tokenizer`, `text_encoder_2` -> `tokenizer_2`."""
    return "tokenizer" + text_encoder_name.removeprefix("text_encoder")


def unwrapped(module: Any) -> Any:
    """The module inside a distributed wrapper (DDP's `.module`), or the module itself."""
    return getattr(module, "module", module)


def _numbered(name: str) -> int:
    tail = name.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else 1


class ModelFamily(Protocol):
    """What a model family provides; the loop, strategies, tools and file formats ask nothing else. A family is
    one file in this folder (its FamilySpec and its Family subclass, finetune/models/family.py) registered in
    `finetune.models.FAMILY_MODULES`; the contract tests cover it from there."""

    # and, read through to its FamilySpec (finetune/models/family.py): name, title, lora_targets,
    # lora_target_presets, conv_lora_targets, text_encoder_lora_targets, hypernetwork_text_stream, refuses,
    # kohya_prefixes, kohya_unet_layout, kohya_base_model_version, embedding_keys, ...
    spec: Any

    def load(self, base: str, *, revision: str | None, variant: str | None, dtype: torch.dtype,
             config: str | None, vae: str | None = None, options: Any = None) -> Components:
        """The frozen base (every part requires_grad False, eval mode) from a hub id, a diffusers folder or a
        single checkpoint (`config`: a folder with its configs); `vae` replaces its VAE; `options`: the recipe's
        `model` section (SD3's text_encoder_3: none leaves T5 out). Raises ModelLoadError."""

    def objective(self, parts: Components, options: Any = None) -> Any:
        """How latents are noised and what is regressed: `noise(latents, generator)` -> noisy input, timesteps
        and target; `weights(timesteps)` -> per-sample loss weights or None (finetune/models/ddpm.py,
        flow_matching.py), from the family's options (None: the ones loading was given)."""

    def text_encoders(self, parts: Components) -> list[tuple[str, Any, Any]]:
        """(part name, tokenizer, unwrapped text encoder) per text encoder, in the pipeline's order."""

    def encode_images(self, parts: Components, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Latents [batch, c, h, w] for pixels [batch, 3, H, W] in [-1, 1], scaled for the denoiser."""

    def encode_image_moments(self, parts: Components, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's latent distribution (mean, std): what the latent cache keeps."""

    def latents_from_moments(self, parts: Components, mean: torch.Tensor, std: torch.Tensor,
                             generator: torch.Generator) -> torch.Tensor:
        """One latent drawn from (mean, std) with `generator`, scaled (and shifted) for the denoiser."""

    def encode_prompts(self, parts: Components, captions: list[str]) -> Any:
        """The text conditioning for captions: a tensor, or a tuple of tensors (SDXL: hidden states, pooled), each
        with the batch first; what the text cache keeps per caption."""

    def caption_window(self, tokenizer: Any, max_token_length: int | None) -> int:
        """Tokens of caption text that reach the text encoder."""

    def tokenizer_of(self, base: str) -> Any | None:
        """The first tokenizer without loading the models (`finetune validate`); None when it cannot be read."""

    def predict(self, parts: Components, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: Any,
                conditions: dict[str, torch.Tensor]) -> torch.Tensor:
        """The denoiser's output for `noisy` latents [batch, c, h, w] at `timesteps`, given the prompts'
        `conditioning` and each image's `conditions` (the batch's, finetune/data/dataset.py: sizes, crop corners)."""

    def pipeline(self, parts: Components, unwrap: Any = None) -> Any:
        """A diffusers inference pipeline sharing the parts (`unwrap` strips distributed wrappers)."""


def one_frame_moments(vae: Any, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A video VAE's latent distribution (mean, std) [B, C, h, w] for images [B, C, H, W] (Qwen-Image's Wan-type
    VAE): each image encoded as a one-frame video `(B, C, 1, H, W)`, the frame axis squeezed."""
    distribution = vae.encode(pixels.to(vae.device, vae.dtype).unsqueeze(2)).latent_dist
    return distribution.mean.squeeze(2), distribution.std.squeeze(2)
