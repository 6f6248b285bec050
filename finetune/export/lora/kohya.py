"""kohya-ss's LoRA file: what AUTOMATIC1111, ComfyUI, Forge and InvokeAI load.

Keys are a component prefix plus the module path with `.` turned into `_`:
`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight` (and `.lora_up.weight`,
and a 0-d `.alpha`; the layer adds `up @ down * alpha / rank`). Text-encoder keys start `lora_te_text_model_...`,
the module path as the CLIP of transformers 4 (and the original checkpoints) names it. The header carries the
`ss_*` training figures kohya writes, which the UIs show, and `sshs_*` hashes of the tensor data.

Going back from underscores to module paths is ambiguous (`attn1_to_q` is `attn1.to_q`), so names are matched
against the model's own module paths when a model is at hand, and otherwise parsed with the vocabulary of path
segments the Stable Diffusion U-Net and CLIP text encoder use. Flux files (`lora_unet_double_blocks_...`) name
Black Forest Labs' modules with q/k/v fused; kohya_flux.py fuses and splits them.

The prefix tables below are the one place that maps kohya's prefixes to the pipeline's component names.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch

from finetune.export.lora import kohya_flux, kohya_sd3
from finetune.export.lora.kohya_metadata import kohya_metadata
from finetune.export.lora.kohya_names import (READ_PREFIXES, SD_NAMING, SGM_BLOCKS, KohyaNaming, naming_of,
                                              sdxl_reference_aliases, sgm_aliases)
from finetune.export.lora.diffusers import with_text_model
from finetune.export.lora.layers import LoraFileError, LoraLayer, LoraWeights
from finetune.io.safetensors_io import save_safetensors
from finetune.models.base import adaptable_modules



def is_kohya(keys: list[str]) -> bool:
    """Whether any key starts with a kohya component prefix (`lora_unet_`, `lora_te_`, ...)."""
    prefixes = tuple(f"{prefix}_" for prefix in READ_PREFIXES)
    return any(k.startswith(prefixes) for k in keys)


def split_name(stem: str) -> tuple[str, str] | None:
    """(component, underscored module name) of a kohya key's stem, e.g. `lora_te1_text_model_...` ->
    ("text_encoder", "text_model_..."); None without a kohya prefix."""
    prefix = next((p for p in sorted(READ_PREFIXES, key=len, reverse=True) if stem.startswith(p + "_")), None)
    return None if prefix is None else (READ_PREFIXES[prefix], stem[len(prefix) + 1:])


def kohya_module(component: str, module: str, naming: KohyaNaming = SD_NAMING) -> str:
    """`lora_unet_down_blocks_0_..._to_q` for unet module `down_blocks.0....to_q` (kohya's module names; an SDXL
    naming gives `lora_unet_input_blocks_...` and `lora_te1_...`, kohya_names.py)."""
    if component not in naming.prefixes:
        raise LoraFileError(f"kohya's format has no prefix for component {component!r}")
    module = with_text_model(component, naming.module_name(component, module))  # kohya keeps CLIP's text_model.
    return f"{naming.prefixes[component]}_{module.replace('.', '_')}"


def to_kohya(weights: LoraWeights, naming: KohyaNaming | None = None) -> dict[str, torch.Tensor]:
    """kohya's tensors for these layers (a 0-d alpha each), named as `naming` says (None: as the layers and header
    tell, kohya_names.naming_of); DoRA and bias changes have no kohya form."""
    naming = naming or naming_of(weights)
    if weights.uses_dora:
        raise LoraFileError("DoRA layers have no kohya form that diffusers reads back (it drops `dora_scale`); "
                            "keep DoRA LoRAs in the diffusers format")
    tensors: dict[str, torch.Tensor] = {}
    for component, module, layer in weights.modules():
        if layer.bias is not None:
            raise LoraFileError(f"{component}.{module} carries a bias change (peft lora_bias), which kohya's "
                                "format cannot hold; keep this file in the diffusers format")
    for component, per_module in weights.layers.items():
        # Flux's denoiser: fused into BFL's modules (kohya_flux.py); the others one to one
        for module, layer in sorted(naming.denoiser_layers(component, per_module).items()):
            stem = kohya_module(component, module, naming)
            tensors[f"{stem}.lora_down.weight"] = layer.down
            tensors[f"{stem}.lora_up.weight"] = layer.up
            tensors[f"{stem}.alpha"] = torch.tensor(float(layer.alpha))
    return tensors


@functools.lru_cache(maxsize=1)
def _segment_vocabulary() -> frozenset[str]:
    """Every module-path segment of an SD 1.x U-Net and CLIP text encoder, from the libraries' own classes
    built without memory (meta device): the words an underscored kohya name is made of."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        models = [UNet2DConditionModel(), CLIPTextModel(CLIPTextConfig())]
    words = {"text_model"}
    for model in models:
        for name, _ in model.named_modules():
            words.update(part for part in name.split(".") if not part.isdigit())
    return frozenset(words)


def parse_module_path(underscored: str) -> str:
    """`down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q` -> `down_blocks.0....attn1.to_q`,
    taking the longest known segment at each point."""
    vocabulary = _segment_vocabulary()
    tokens, parts, i = underscored.split("_"), [], 0
    while i < len(tokens):
        for j in range(len(tokens), i, -1):
            segment = "_".join(tokens[i:j])
            if segment.isdigit() or segment in vocabulary:
                parts.append(segment)
                i = j
                break
        else:
            raise LoraFileError(f"cannot tell which module {underscored!r} names; give the base model "
                                "(--base) so names are matched against its modules")
    return ".".join(parts)


def module_paths(holder) -> dict[str, list[str]]:
    """The Linear and Conv2d module paths of the denoiser and each text encoder of `holder` (a pipeline or
    Components): what kohya's underscored names are matched against."""
    layers = (torch.nn.Linear, torch.nn.Conv2d)
    return {name: [n for n, m in getattr(module, "module", module).named_modules() if isinstance(m, layers)]
            for name, module in adaptable_modules(holder).items()}


def name_resolver(component: str, names: list[str] | None):
    """underscored kohya name -> module path: looked up among `names` (the model's), or parsed without them."""
    if names is None:
        def parse(underscored: str) -> str:
            if component == "unet" and underscored.startswith(SGM_BLOCKS):  # kohya's SDXL names
                aliases = sdxl_reference_aliases()
                if underscored not in aliases:
                    raise LoraFileError(f"{underscored!r} is no module of the SDXL U-Net; give the base model "
                                        "(--base) so names are matched against its modules")
                return aliases[underscored]
            path = parse_module_path(underscored)
            return path.removeprefix("text_model.") if component.startswith("text_encoder") and \
                not _reference_has_text_model() else path
        return parse
    # a U-Net's original (SGM) names too: kohya's SDXL files use them
    table = sgm_aliases(names) if component == "unet" else {}
    for name in names:
        table[name.replace(".", "_")] = name
        if component.startswith("text_encoder") and not name.startswith("text_model."):
            table[f"text_model_{name.replace('.', '_')}"] = name

    def look_up(underscored: str) -> str:
        if underscored not in table:
            raise LoraFileError(f"the model has no {component} module named like {underscored!r}: this LoRA "
                                "was made for another base model (or architecture)")
        return table[underscored]
    return look_up


@functools.lru_cache(maxsize=1)
def _reference_has_text_model() -> bool:
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        return any(name.startswith("text_model") for name, _ in CLIPTextModel(CLIPTextConfig()).named_modules())


def from_kohya(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str,
               module_names: dict[str, list[str]] | None = None) -> LoraWeights:
    """A kohya file's tensors and header as layers; `module_names` (component -> the model's module paths)
    resolves the underscored names exactly, without it they are parsed."""
    grouped: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        stem, _, role = key.partition(".")
        named = split_name(stem)
        if named is None and stem.startswith("lora_te3_"):  # kohya's Flux/SD3 T5 layers (train_t5xxl)
            raise LoraFileError(f"{source}: {key!r} adapts T5-XXL (kohya's lora_te3_), which finetune never "
                                "adapts or loads (nor does diffusers' converter); remove the lora_te3_ keys")
        if named is None:
            raise LoraFileError(f"{source}: key {key!r} has no kohya prefix (lora_unet_, lora_te_, ...)")
        if role not in ("lora_down.weight", "lora_up.weight", "alpha"):
            raise LoraFileError(f"{source}: key {key!r} is not a plain LoRA weight (LyCORIS LoHa/LoKr and DoRA "
                                "kohya files cannot be converted yet)")
        grouped.setdefault(named, {})[role] = value
    layers: dict[str, dict[str, LoraLayer]] = {}
    resolvers = {}
    unet_names = [name for component, name in grouped if component == "unet"]
    flux = kohya_flux.is_flux_kohya(unet_names)
    sd3 = not flux and kohya_sd3.is_sd3_kohya(unet_names)
    bfl: dict[str, LoraLayer] = {}  # a Flux (or SD3) file's transformer layers under BFL's (SAI's) names
    for (component, underscored), found in sorted(grouped.items()):
        if "lora_down.weight" not in found or "lora_up.weight" not in found:
            raise LoraFileError(f"{source}: {underscored} has only one of its two LoRA factors")
        down = found["lora_down.weight"]
        # kohya: no alpha means scale 1, i.e. alpha equal to the rank
        layer = LoraLayer(down, found["lora_up.weight"], float(found["alpha"]) if "alpha" in found
                          else float(down.shape[0]))
        if (flux or sd3) and component == "unet":
            bfl[underscored] = layer
            continue
        if component not in resolvers:
            names = None if module_names is None else module_names.get(component, [])
            resolvers[component] = name_resolver(component, names)
        layers.setdefault(component, {})[resolvers[component](underscored)] = layer
    if bfl:
        layers["transformer"] = _transformer(bfl, source, module_names, kohya_sd3.from_sai if sd3 else
                                             kohya_flux.from_bfl)
    return LoraWeights(layers, dict(metadata), format="kohya")


def _transformer(original: dict[str, LoraLayer], source: str, module_names: dict[str, list[str]] | None,
                 to_diffusers) -> dict[str, LoraLayer]:
    """A kohya Flux or SD3 file's U-Net layers (the original model's names) as the diffusers transformer's, by
    `to_diffusers` (kohya_flux.from_bfl, kohya_sd3.from_sai), checked against the model's modules."""
    layers = to_diffusers(original, source)
    if module_names is not None:
        missing = sorted(set(layers) - set(module_names.get("transformer", [])))
        if missing:
            raise LoraFileError(f"{source}: the model has no transformer module {missing[0]!r}: this kohya "
                                "LoRA was made for another base model (or architecture)")
    return layers


def data_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """The hashes kohya puts in the header for sd-webui-additional-networks: SHA-256 of the tensor bytes (the
    file after its header), and the legacy one over 64 KiB at 1 MiB into the file with only `ss_*` metadata."""
    from safetensors.torch import save

    plain = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    data = save(plain, metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_length = int.from_bytes(data[:8], "little")
    return {"sshs_model_hash": hashlib.sha256(data[8 + header_length:]).hexdigest(),
            "sshs_legacy_hash": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]}


def write_kohya(weights: LoraWeights, path: Path, output_name: str | None = None,
                dtype: torch.dtype | None = None, naming: KohyaNaming | None = None) -> Path:
    """The kohya file, with the `ss_*` figures and hashes; `output_name` (default: the file's stem) is the name
    the UIs show and AUTOMATIC1111's `<lora:NAME:1>` uses; `naming`: the family's (kohya_names.naming_for)."""
    path = Path(path)
    naming = naming or naming_of(weights)
    tensors = to_kohya(weights, naming)
    if dtype is not None:
        # alphas stay exact in fp32 whatever the weights' dtype
        tensors = {k: v if k.endswith(".alpha") else v.to(dtype) for k, v in tensors.items()}
    metadata = kohya_metadata(weights, output_name or path.stem, naming.version)
    metadata.update(data_hashes(tensors, metadata))
    return save_safetensors(tensors, path, metadata)
