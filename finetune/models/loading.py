"""Loading a frozen base the ways users point at one (a hub id, a diffusers folder, a single checkpoint), with
errors that say what to do; shared by the families."""
from __future__ import annotations

import os
import re
from typing import Any

import torch

from finetune.models.base import Components, ModelLoadError, pipeline_components
from finetune.models.pipeline_folder import parts_stored_as_none


def load_frozen(pipeline_class: Any, base: str, *, revision: str | None, variant: str | None, dtype: torch.dtype,
                config: str | None, vae: str | None, extra_kwargs: dict[str, Any], ddpm: bool = True,
                part_dtypes: dict[str, torch.dtype] | None = None) -> Components:
    """`pipeline_class` (a diffusers pipeline) from `base`, every part frozen and in eval mode; `vae` replaces
    its VAE; `extra_kwargs` go to the loader (a part given as None is not loaded); `ddpm`: keep a DDPM training
    scheduler with the base's noise schedule (the flow-matching objective needs none); `part_dtypes`: parts read
    in another dtype than `dtype` (SDXL's VAE in fp32). Raises ModelLoadError naming the base (or model.vae)
    and the fix."""
    from diffusers import DDPMScheduler

    path = os.path.expanduser(base)
    try:
        if os.path.isfile(path):
            refuse_unsafe_pickle(path)
            pipe = pipeline_class.from_single_file(path, config=config, dtype=dtype, **extra_kwargs)
            for name, part_dtype in (part_dtypes or {}).items():  # the single-file loader takes one dtype
                cast(getattr(pipe, name), part_dtype)
        else:
            # a folder saved without a part (SD3 without T5) loads without it, as it was saved
            # each part read from its file in its own dtype ({"default": ..., "vae": ...}, diffusers' per-part form)
            dtypes = {"default": dtype, **part_dtypes} if part_dtypes else dtype
            pipe = pipeline_class.from_pretrained(path, revision=revision, variant=variant, dtype=dtypes,
                                                  **{**parts_stored_as_none(path), **extra_kwargs})
    except ModelLoadError:
        raise
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ModelLoadError(_explain_load_failure(base, exc)) from exc
    if vae is not None:
        try:
            pipe.vae = load_vae(vae, (part_dtypes or {}).get("vae", dtype))
        except (OSError, ValueError, EnvironmentError) as exc:
            raise ModelLoadError(_explain_load_failure(vae, exc, key="model.vae")) from exc
    parts = pipeline_components(pipe, base, DDPMScheduler.from_config(pipe.scheduler.config) if ddpm else None,
                                {"sampling_scheduler": pipe.scheduler})
    for module in parts.modules.values():
        module.requires_grad_(False)
        module.eval()
    return parts


def cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`module` in `dtype`, in place. torch's own cast, not diffusers' ModelMixin.to: that one warns "There are
    modules in ... that should be kept in float32: []" on every dtype cast, even when the model keeps no
    module in float32 (an AutoencoderKL keeps none; diffusers 0.42 tests the list against None after
    defaulting it to []), so for these casts it is a false alarm, printed on every SDXL run."""
    return torch.nn.Module.to(module, dtype)


def load_vae(source: str, dtype: torch.dtype) -> Any:
    """An AutoencoderKL from a folder holding one (config.json), a pipeline folder (its vae/), a single file, or
    a hub id."""
    from diffusers import AutoencoderKL

    path = os.path.expanduser(source)
    if os.path.isfile(path):
        refuse_unsafe_pickle(path)
        return AutoencoderKL.from_single_file(path, torch_dtype=dtype)
    subfolder = "vae" if os.path.isdir(os.path.join(path, "vae")) else None
    return AutoencoderKL.from_pretrained(path, subfolder=subfolder, torch_dtype=dtype)


def refuse_unsafe_pickle(path: str) -> None:
    """A .ckpt/.pt/.bin is a pickle that could run code; accept it only if it loads with weights_only=True."""
    if path.lower().endswith(".safetensors"):
        return
    from finetune.io.pickle_files import UnsafePickleError, load_plain_pickle

    try:
        load_plain_pickle(path, "checkpoint", mmap=True)  # mmap: a 4 GB checkpoint is not read into memory
    except UnsafePickleError:
        raise ModelLoadError(
            f"model.base: {path} is a pickle that needs more than plain tensors to load (it could run code), "
            "so it was not loaded. Convert it to .safetensors with a tool you trust, or use the model's "
            "diffusers folder"
        ) from None


def _explain_load_failure(base: str, exc: Exception, key: str = "model.base") -> str:
    damaged = _damaged_weights_file(exc, key)
    if damaged is not None:
        return damaged
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    text = f"could not load {key} {base!r}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if not os.path.exists(os.path.expanduser(base)) and base.startswith((".", "/", "~")):
        return (f"{key}: {base} does not exist; give an existing diffusers folder, a single checkpoint file, or a "
                "hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5")
    if not os.path.exists(os.path.expanduser(base)):
        why = "HF_HUB_OFFLINE is set" if offline else "the hub may be unreachable from this machine"
        text += (f"\n  {base!r} is not a local path, so it was looked up on the Hugging Face hub and {why}. "
                 f"Download it where there is network (`hf download {base} --local-dir DIR`: huggingface_hub's "
                 f"command) and set {key} to that folder.")
    return text


# how diffusers names a part's weights file that failed to load ("Unable to load weights from checkpoint file for
# 'PATH' at 'PATH'"); the library's own error (safetensors', torch's) is chained below it
_WEIGHTS_FILE = re.compile(r"checkpoint file for '([^']+)'")


def _damaged_weights_file(exc: BaseException, key: str) -> str | None:
    """The message for a part's weights file that is cut short or damaged (an interrupted download or copy),
    found along `exc`'s chain of causes; None when the chain names no such file."""
    from finetune.file_errors import CUT_SHORT, read_problem

    path, seen, link = None, set(), exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        found = _WEIGHTS_FILE.search(str(link))
        path = path or (found.group(1) if found else None)
        if path and os.path.isfile(path):
            problem = read_problem(link, path, f"{key}: the weights file", "download or copy the model again")
            if problem is not None and CUT_SHORT in str(problem):
                return str(problem)
        link = link.__cause__ or link.__context__
    return None
