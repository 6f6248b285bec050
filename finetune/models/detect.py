"""Which model family a base is, from what can be read without loading it (no torch): a diffusers folder's
`model_index.json` (`_class_name`), or a single `.safetensors` checkpoint's key names, against the registered
families' specs (`pipeline`, `also_recognised`, `single_file_keys`). A hub id cannot be read
offline before loading; `model.family` says it then."""
from __future__ import annotations

import json
import os

from finetune.models import specs

# what people bring that finetune does not train yet, by pipeline class, and by a key only that family's
# single-file checkpoints hold (diffusers' single_file_utils.CHECKPOINT_KEY_NAMES; matched with or without
# ComfyUI's `model.diffusion_model.`); each is refused unless a registered family's spec claims it
NOT_YET = {"SanaPipeline": "Sana", "PixArtSigmaPipeline": "PixArt-Sigma"}
SINGLE_FILE_KEYS = (("blocks.0.cross_attn.q_linear.", "Sana or PixArt"),)
_COMFY = "model.diffusion_model."


class UnsupportedFamily(ValueError):
    """The base is a model family finetune does not train (yet); the message names it and what is supported."""


def family_of(base: str) -> str | None:
    """The family (a registered spec's name) of a base known to be one, None when it cannot be told before
    loading (a hub id, a .ckpt); raises UnsupportedFamily naming the family of a base finetune cannot train."""
    path = os.path.expanduser(base)
    index = os.path.join(path, "model_index.json")
    if os.path.isfile(index):
        return _family_in_index(base, index)
    if os.path.isfile(path) and path.endswith(".safetensors"):
        from finetune.io.safetensors_io import read_header

        keys = read_header(path, "model.base file").keys  # FileProblem when cut short or damaged
        keys += [k.removeprefix(_COMFY) for k in keys if k.startswith(_COMFY)]
        signed = [spec for spec in specs().values() if spec.single_file_keys and all(
            any(k.startswith(prefix) for k in keys) for prefix in spec.single_file_keys)]
        best = max(signed, key=lambda spec: len(spec.single_file_keys)) if signed else None
        for prefix, family in SINGLE_FILE_KEYS:
            if any(k.startswith(prefix) for k in keys) and prefix not in (best.single_file_keys if best else ()):
                _refuse(base, f"a {family} checkpoint (its keys start {prefix}...)")
        return best.name if best else None
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
    registered = next((spec.name for spec in specs().values() if name in (spec.pipeline, *spec.also_recognised)),
                      None)
    if registered is None and name in NOT_YET:
        _refuse(base, f"a {NOT_YET[name]} pipeline ({name} in model_index.json)")
    return registered


def _refuse(base: str, what: str) -> None:
    trained = ", ".join(f"{spec.title} ({spec.name})" for spec in specs().values())
    raise UnsupportedFamily(f"model.base: {base} is {what}; finetune trains {trained} today (model.family). "
                            "Point model.base at a model of one of those families")
