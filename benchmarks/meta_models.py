"""The models benchmarks/memory.py estimates: the real transformers, text encoders and VAEs built on the meta device
(no weights, nothing downloaded) from the published config.json values in benchmarks/configs/ (each folder's
README says where they come from). `MODELS` names each model's parts, `BUILDERS` builds a part from its class,
`MODEL_FOR_BASE` tells a recipe's model from its `model.base`."""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

CONFIGS = Path(__file__).resolve().parent / "configs"


@dataclass(frozen=True)
class Model:
    name: str
    family: str  # the finetune family (its transformer class in BUILDERS, its block ratios in activations.FAMILIES)
    hub: str
    transformer: str
    text_tokens: int
    encoders: tuple[tuple[str, str], ...]  # (BUILDERS kind, config) per text encoder
    vae: tuple[str, str]  # (BUILDERS kind, config)
    pixels_per_token: int = 16  # image side / token grid side: 8x VAEs with 2x2 patches; Sana's 32x DC-AE, 1x1


SD3_ENCODERS = (("clip+", "flux/text_encoder"), ("clip+", "sdxl/text_encoder_2"), ("t5", "flux/text_encoder_2"))
MODELS = {
    "flux-dev": Model("Flux.1-dev", "flux", "black-forest-labs/FLUX.1-dev", "flux/transformer", 512,
                      (("clip", "flux/text_encoder"), ("t5", "flux/text_encoder_2")), ("kl", "flux/vae")),
    # Kontext's transformer, encoders and VAE have Flux.1-dev's configs (black-forest-labs/FLUX.1-Kontext-dev): the
    # same network, other weights
    "flux-kontext-dev": Model("Flux.1 Kontext", "flux_kontext", "black-forest-labs/FLUX.1-Kontext-dev",
                              "flux/transformer", 512, (("clip", "flux/text_encoder"), ("t5", "flux/text_encoder_2")),
                              ("kl", "flux/vae")),
    "sd35-large": Model("SD3.5 Large", "sd3", "stabilityai/stable-diffusion-3.5-large", "sd35/transformer_large",
                        77 + 256, SD3_ENCODERS, ("kl", "sd35/vae")),
    "sd35-medium": Model("SD3.5 Medium", "sd3", "stabilityai/stable-diffusion-3.5-medium",
                         "sd35/transformer_medium", 77 + 256, SD3_ENCODERS, ("kl", "sd35/vae")),
    "flux2-dev": Model("Flux.2-dev", "flux2", "black-forest-labs/FLUX.2-dev", "flux2/transformer_dev", 512,
                       (("mistral3", "flux2/text_encoder_dev"),), ("kl-flux2", "flux2/vae")),
    "flux2-klein-9b": Model("Flux.2 klein 9B", "flux2", "black-forest-labs/FLUX.2-klein-base-9B",
                            "flux2/transformer_klein_base_9b", 512,
                            (("qwen3", "flux2/text_encoder_klein_base_9b"),), ("kl-flux2", "flux2/vae")),
    # text tokens: the caption's own length (the family pads to 512 and cuts back to the batch's longest): 512 bounds it
    "qwen-image": Model("Qwen-Image", "qwen_image", "Qwen/Qwen-Image", "qwen_image/transformer", 512,
                        (("qwen2.5-vl", "qwen_image/text_encoder"),), ("kl-qwen_image", "qwen_image/vae")),
    "chroma-hd": Model("Chroma1-HD", "chroma", "lodestones/Chroma1-HD", "chroma/transformer", 512,
                       (("t5", "flux/text_encoder_2"),), ("kl", "flux/vae")),
    # text tokens: the pipelines' max_sequence_length (the caption's own length at most: it bounds it)
    "lumina2": Model("Lumina-Image 2.0", "lumina2", "Alpha-VLLM/Lumina-Image-2.0", "lumina2/transformer", 256,
                     (("gemma2", "lumina2/text_encoder"),), ("kl", "flux/vae")),
    "sana-1600m": Model("Sana 1.6B", "sana", "Efficient-Large-Model/Sana_1600M_1024px_diffusers",
                        "sana/transformer_1600m_1024px", 300, (("gemma2", "sana/text_encoder"),), ("dc", "sana/vae"),
                        pixels_per_token=32),
    # the joint stream: T5's 128 tokens, Llama's last layer's 128, and each block's own Llama layer's 128
    "hidream-i1-full": Model("HiDream-I1 Full", "hidream", "HiDream-ai/HiDream-I1-Full", "hidream/transformer_full",
                             3 * 128, (("clip+", "flux/text_encoder"), ("clip+", "sdxl/text_encoder_2"),
                                       ("t5", "flux/text_encoder_2"), ("llama", "hidream/text_encoder_4")),
                             ("kl", "flux/vae")),
    "krea2": Model("Krea 2", "krea2", "krea/Krea-2-Raw", "krea2/transformer", 512,
                   (("qwen3-vl", "krea2/text_encoder"),), ("kl-qwen_image", "qwen_image/vae")),
    # 16x VAE, latents not packed: one token per latent pixel; text: 512 bounds the caption (as Qwen-Image's)
    "qwen-image-2.1": Model("Qwen-Image 2.1", "qwen_image_2_1", "Qwen/Qwen-Image-2.1", "qwen_image_2_1/transformer",
                            512, (("qwen3-vl-cg", "qwen_image_2_1/text_encoder"),),
                            ("kl-qwen_image_2_1", "qwen_image_2_1/vae")),
}
# a recipe's model.base (lowered) -> MODELS key: the first entry whose strings all occur in it (None: not modelled)
MODEL_FOR_BASE = (
    (("kontext",), "flux-kontext-dev"),  # before Flux.1: FLUX.1-Kontext-dev
    (("flux.1",), "flux-dev"),
    (("flux.2-dev",), "flux2-dev"),
    (("flux.2-klein", "9b"), "flux2-klein-9b"),  # the base and the step-distilled 9B share the transformer
    (("qwen-image-2.1",), "qwen-image-2.1"),  # before Qwen-Image: single stream, RGBA VAE
    (("qwen-image",), "qwen-image"),
    (("chroma",), "chroma-hd"),  # Chroma1-Base and -HD share the shape
    (("lumina",), "lumina2"),
    (("sana_1600m",), "sana-1600m"),  # Sana 1.0 1.6B (1024 px; the 512 and 2K/4K ones share the transformer shape)
    (("sana",), None),  # 600M, Sana 1.5 (4.8B, other configs), Sprint: not modelled
    (("hidream-i1",), "hidream-i1-full"),  # Full, Dev and Fast share the transformer
    (("krea-2",), "krea2"),
    (("krea2",), "krea2"),
    (("3.5", "large"), "sd35-large"),
    (("3.5", "medium"), "sd35-medium"),
)


def _config(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


def _builder(module: str, model_class: str, config_class: str | None = None):
    """Builds `model_class` (from diffusers or transformers, imported on use) from a config dict: as keyword
    arguments (diffusers), or through `config_class` (transformers)."""
    def build(config: dict):
        import importlib

        library = importlib.import_module(module)
        if config_class is None:
            return getattr(library, model_class)(**config)
        return getattr(library, model_class)(getattr(library, config_class)(**config))
    return build


# kind -> builder: the denoisers by family, the VAEs, the text encoders
BUILDERS = {
    "flux": _builder("diffusers", "FluxTransformer2DModel"),
    "flux_kontext": _builder("diffusers", "FluxTransformer2DModel"),
    "sd3": _builder("diffusers", "SD3Transformer2DModel"),
    "flux2": _builder("diffusers", "Flux2Transformer2DModel"),
    "qwen_image": _builder("diffusers", "QwenImageTransformer2DModel"),
    "chroma": _builder("diffusers", "ChromaTransformer2DModel"),
    "lumina2": _builder("diffusers", "Lumina2Transformer2DModel"),
    "sana": _builder("diffusers", "SanaTransformer2DModel"),
    "hidream": _builder("diffusers", "HiDreamImageTransformer2DModel"),
    "krea2": _builder("diffusers", "Krea2Transformer2DModel"),
    "qwen_image_2_1": _builder("diffusers", "QwenImage21Transformer2DModel"),
    "kl": _builder("diffusers", "AutoencoderKL"),
    "dc": _builder("diffusers", "AutoencoderDC"),
    "kl-flux2": _builder("diffusers", "AutoencoderKLFlux2"),
    "kl-qwen_image": _builder("diffusers", "AutoencoderKLQwenImage"),
    "kl-qwen_image_2_1": _builder("diffusers", "AutoencoderKLQwenImage21"),
    "clip": _builder("transformers", "CLIPTextModel", "CLIPTextConfig"),
    "clip+": _builder("transformers", "CLIPTextModelWithProjection", "CLIPTextConfig"),
    "t5": _builder("transformers", "T5EncoderModel", "T5Config"),
    "mistral3": _builder("transformers", "Mistral3ForConditionalGeneration", "Mistral3Config"),
    "qwen3": _builder("transformers", "Qwen3ForCausalLM", "Qwen3Config"),
    "gemma2": _builder("transformers", "Gemma2Model", "Gemma2Config"),
    "llama": _builder("transformers", "LlamaForCausalLM", "LlamaConfig"),
    "qwen3-vl": _builder("transformers", "Qwen3VLModel", "Qwen3VLConfig"),
    "qwen3-vl-cg": _builder("transformers", "Qwen3VLForConditionalGeneration", "Qwen3VLConfig"),  # with its lm_head
    "qwen2.5-vl": _builder("transformers", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig"),
}


@functools.lru_cache(maxsize=None)
def build(model: Model):
    """(transformer, [text encoders], vae) on the meta device, built once per model."""
    with torch.device("meta"):
        denoiser = BUILDERS[model.family](_config(model.transformer))
        encoders = [BUILDERS[kind](_config(config)) for kind, config in model.encoders]
        vae = BUILDERS[model.vae[0]](_config(model.vae[1]))
    return denoiser, encoders, vae


def vae_first_width(vae) -> int:
    """Channels of the VAE's full-resolution stage: AutoencoderKL's block_out_channels[0], the Wan-type's base_dim,
    the DC-AE's encoder_block_out_channels[0]."""
    config = vae.config
    for key in ("block_out_channels", "encoder_block_out_channels"):
        if key in config:
            return config[key][0]
    return config["base_dim"]


def width(denoiser) -> int:
    """The transformer's hidden width: heads x head size, or Lumina 2's hidden_size."""
    config = denoiser.config
    if "attention_head_dim" in config:
        return config.num_attention_heads * config.attention_head_dim
    return config.hidden_size


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def model_for(base: str) -> str | None:
    lowered = base.lower()
    return next((key for needles, key in MODEL_FOR_BASE if all(n in lowered for n in needles)), None)
