"""Which model family a base is, from what can be read without loading it (no torch): a diffusers folder's
`model_index.json` (`_class_name`), or a single `.safetensors` checkpoint's key names. A hub id cannot be read
offline before loading; `model.family` says it then."""
from __future__ import annotations

import json
import os

# diffusers pipeline classes -> the family that trains them
FAMILIES = {"StableDiffusionPipeline": "sd", "StableDiffusionImg2ImgPipeline": "sd",
            "StableDiffusionInpaintPipeline": "sd", "StableDiffusionXLPipeline": "sdxl",
            "StableDiffusionXLImg2ImgPipeline": "sdxl", "StableDiffusion3Pipeline": "sd3",
            "FluxPipeline": "flux", "ZImagePipeline": "zimage"}
# how messages name the families trained here
NAMES = {"sd": "Stable Diffusion 1.x/2.x", "sdxl": "Stable Diffusion XL", "sd3": "Stable Diffusion 3",
         "flux": "Flux.1", "zimage": "Z-Image"}
# what people bring that finetune does not train yet, by pipeline class, and by a key only that family's
# single-file checkpoints hold (diffusers' single_file_utils.CHECKPOINT_KEY_NAMES; matched with or without
# ComfyUI's `model.diffusion_model.`). Flux.2 and Chroma files also hold Flux.1's double_blocks: they come first
NOT_YET = {"SanaPipeline": "Sana", "PixArtSigmaPipeline": "PixArt-Sigma",
           "Flux2Pipeline": "Flux.2", "ChromaPipeline": "Chroma"}
SINGLE_FILE_KEYS = (("single_stream_modulation.", "Flux.2"), ("distilled_guidance_layer.", "Chroma"),
                    ("blocks.0.cross_attn.q_linear.", "Sana or PixArt"))
_COMFY = "model.diffusion_model."


class UnsupportedFamily(ValueError):
    """The base is a model family finetune does not train (yet); the message names it and what is supported."""


def family_of(base: str) -> str | None:
    """The family ("sd", "sdxl", "sd3", "flux") of a base known to be one, None when it cannot be told before
    loading (a hub id, a .ckpt); raises UnsupportedFamily naming the family of a base finetune cannot train."""
    path = os.path.expanduser(base)
    index = os.path.join(path, "model_index.json")
    if os.path.isfile(index):
        return _family_in_index(base, index)
    if os.path.isfile(path) and path.endswith(".safetensors"):
        from finetune.export.safetensors_io import read_header

        keys = read_header(path, "model.base file").keys  # FileProblem when cut short or damaged
        keys += [k.removeprefix(_COMFY) for k in keys if k.startswith(_COMFY)]
        for prefix, family in SINGLE_FILE_KEYS:
            if any(k.startswith(prefix) for k in keys):
                _refuse(base, f"a {family} checkpoint (its keys start {prefix}...)")
        if any(k.startswith("double_blocks.") for k in keys):  # Flux.1's double-stream blocks (BFL's names)
            return "flux"
        if any(k.startswith("conditioner.embedders.1.") for k in keys):  # SDXL's second text encoder
            return "sdxl"
        if any(k.startswith("model.diffusion_model.joint_blocks.") for k in keys):  # SD3's MMDiT
            return "sd3"
        return "sd" if any(k.startswith("model.diffusion_model.input_blocks.") for k in keys) else None
    return None


def hub_family(base: str, revision: str | None = None) -> str | None:
    """The family of a hub id from its model_index.json alone (a few hundred bytes, fetched as from_pretrained
    would, or from the local hub cache); None when it cannot be fetched or the id is no pipeline repository."""
    if os.path.exists(os.path.expanduser(base)) or base.count("/") != 1:
        return None
    try:
        from huggingface_hub import hf_hub_download

        index = hf_hub_download(base, "model_index.json", revision=revision)
    except Exception:  # offline, unknown repository, no such file: loading will say what is wrong
        return None
    return _family_in_index(base, index)


def _family_in_index(base: str, index: str) -> str | None:
    try:
        with open(index, encoding="utf-8") as handle:
            name = json.load(handle).get("_class_name", "")
    except (OSError, ValueError):
        return None
    if name in NOT_YET:
        _refuse(base, f"a {NOT_YET[name]} pipeline ({name} in model_index.json)")
    return FAMILIES.get(name)


def _refuse(base: str, what: str) -> None:
    raise UnsupportedFamily(f"model.base: {base} is {what}; finetune trains Stable Diffusion 1.x and 2.x "
                            "(model.family: sd), SDXL (sdxl), SD3/3.5 (sd3), Flux.1 dev/schnell (flux) and "
                            "Z-Image (zimage) today. Point model.base at a model of one of those families")
