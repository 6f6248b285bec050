"""kohya's Flux.1 LoRA layout: the transformer's modules under Black Forest Labs' own names, as kohya-ss
sd-scripts (networks/lora_flux.py), ComfyUI and Forge name them, with the two fused projections fused.

diffusers splits what BFL's model fuses: a double block's `img_attn.qkv` is `attn.to_q/to_k/to_v` (its
`txt_attn.qkv`: `attn.add_q/k/v_proj`), and a single block's `linear1` is `attn.to_q/to_k/to_v` and `proj_mlp`,
stacked in that order along the output. The other modules are one to one (tables below, from diffusers'
`_convert_kohya_flux_lora_to_diffusers` and its Flux checkpoint converter); `final_layer.adaLN_modulation.1` puts
(shift, scale) where diffusers' `norm_out.linear` puts (scale, shift), so its up's two halves swap.

Fusing is exact: the members' downs are stacked ([sum r, in]) and their ups placed block-diagonally
([sum out, sum r]), with alpha scaled so that alpha / rank stays each member's; a member without a LoRA gets zero
rows. Reading splits a fused pair back: block-diagonal (ours, kohya's `split_qkv`) into the members' own compact
LoRAs, a shared down (what kohya trains by default) into members that share it. The widths come from the layers
themselves (a fused module's input width is the transformer's inner width, heads x head_dim, which is also each
of q/k/v's output width), never Flux.1's 3072 / 12288, so any Flux-shaped transformer works.
"""
from __future__ import annotations

import re

import torch

from finetune.export.lora.layers import LoraFileError, LoraLayer

# diffusers module -> BFL module, per double block, per single block, and at the top
DOUBLE = {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0",
          "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
          "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin"}
SINGLE = {"proj_out": "linear2", "norm.linear": "modulation.lin"}
TOP = {"x_embedder": "img_in", "context_embedder": "txt_in",
       "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
       "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
       "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
       "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
       "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
       "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
       "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1"}
SWAPPED = "final_layer.adaLN_modulation.1"  # (shift, scale) in BFL's order, (scale, shift) in diffusers'
# BFL's fused modules -> their diffusers members, in the order their outputs are stacked
DOUBLE_FUSED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
MLP_RATIO = 4  # diffusers' FluxSingleTransformerBlock: proj_mlp is 4x the inner width (not a config value)

_BLOCK = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)")
_BFL_BLOCK = re.compile(r"(double_blocks|single_blocks)_(\d+)_(.+)")


def is_flux_kohya(underscored: list[str]) -> bool:
    """Whether a kohya file's U-Net names (without `lora_unet_`) are BFL's Flux blocks."""
    return any(_BFL_BLOCK.match(name) for name in underscored)


def is_flux_diffusers(modules: list[str]) -> bool:
    """Whether diffusers-named transformer modules are a Flux transformer's (its single-stream blocks, or the
    embedders only Flux has); SD3's joint blocks alone look the same, so those are not enough."""
    return any(m.startswith(("single_transformer_blocks.", "time_text_embed.guidance_embedder")) for m in modules)


def _swap_halves(up: torch.Tensor) -> torch.Tensor:
    first, second = up.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def fuse(members: list[tuple[LoraLayer | None, int]]) -> LoraLayer:
    """One LoRA for a fused module from its members' (layer or None, output width), exactly: downs stacked
    [sum r, in], ups block-diagonal [sum width, sum r], alpha = scale x sum r. Members with different scales
    (alpha / rank) get theirs folded into their up, and the fused scale is 1."""
    present = [layer for layer, _ in members if layer is not None]
    scales = {layer.alpha / layer.rank for layer in present}
    same = len(scales) == 1
    rank = sum(layer.rank for layer in present)
    dtype = present[0].up.dtype if same else torch.float32
    up = torch.zeros(sum(width for _, width in members), rank, dtype=dtype)
    row = column = 0
    for layer, width in members:
        if layer is not None:
            if layer.up.shape[0] != width:
                raise LoraFileError(f"a fused member is {layer.up.shape[0]} wide where {width} was expected")
            block = layer.up if same else layer.up.float() * (layer.alpha / layer.rank)
            up[row:row + width, column:column + layer.rank] = block
            column += layer.rank
        row += width
    down = torch.cat([layer.down.to(dtype) for layer in present])
    return LoraLayer(down, up, next(iter(scales)) * rank if same else float(rank))


def split(layer: LoraLayer, widths: list[int], names: tuple[str, ...]) -> dict[str, LoraLayer]:
    """A fused module's LoRA as its members' (name -> layer). Block-diagonal ups (each member's rows use columns no
    other member's use) give each member its own columns of the down, compact; members with all-zero rows (not
    trained) are left out. Otherwise (kohya's shared down) each member keeps the whole down and its rows."""
    if sum(widths) != layer.up.shape[0]:
        raise LoraFileError(f"a fused LoRA of {layer.up.shape[0]} outputs cannot split into {widths}")
    blocks = torch.split(layer.up, widths, dim=0)
    used = [(block != 0).any(dim=0) for block in blocks]
    overlaps = torch.stack(used).sum(dim=0).gt(1).any()
    if overlaps or not any(columns.any() for columns in used):
        return {name: LoraLayer(layer.down, block.contiguous(), layer.alpha) for name, block in zip(names, blocks)}
    out = {}
    for name, block, columns in zip(names, blocks, used):
        count = int(columns.sum())
        if count:  # alpha / rank stays the fused module's
            out[name] = LoraLayer(layer.down[columns].contiguous(), block[:, columns].contiguous(),
                                  layer.alpha * count / layer.rank)
    return out


def to_bfl(layers: dict[str, LoraLayer]) -> dict[str, LoraLayer]:
    """A Flux transformer's LoRA layers (diffusers module path -> layer) as kohya's: BFL module path -> layer, q/k/v
    (and a single block's proj_mlp) fused. LoraFileError names a module kohya's layout has no place for."""
    out: dict[str, LoraLayer] = {}
    fused: dict[tuple[str, str], dict[str, LoraLayer]] = {}
    for module, layer in layers.items():
        found = _BLOCK.fullmatch(module)
        if found:
            kind, index, rest = found.groups()
            prefix = f"{'double' if kind == 'transformer_blocks' else 'single'}_blocks.{index}"
            table, groups = (DOUBLE, DOUBLE_FUSED) if kind == "transformer_blocks" else (SINGLE, SINGLE_FUSED)
            if rest in table:
                out[f"{prefix}.{table[rest]}"] = layer
                continue
            group = next((name for name, members in groups.items() if rest in members), None)
            if group is not None:
                fused.setdefault((prefix, group), {})[rest] = layer
                continue
        elif module in TOP:
            name = TOP[module]
            out[name] = LoraLayer(layer.down, _swap_halves(layer.up), layer.alpha) if name == SWAPPED else layer
            continue
        raise LoraFileError(f"transformer.{module} has no place in kohya's Flux layout (BFL's module names); keep "
                            "this LoRA in the diffusers format")
    for (prefix, group), present in fused.items():
        members = (DOUBLE_FUSED if prefix.startswith("double") else SINGLE_FUSED)[group]
        inner = next(iter(present.values())).down.shape[1]  # the fused module's input: the inner width
        widths = [present[m].up.shape[0] if m in present else MLP_RATIO * inner if m == "proj_mlp" else inner
                  for m in members]
        out[f"{prefix}.{group}"] = fuse([(present.get(m), width) for m, width in zip(members, widths)])
    return out


def _bfl_paths() -> dict[str, tuple[str, tuple[str, ...] | None]]:
    """Underscored BFL module tail -> (BFL dotted tail, fused members or None), for blocks and the top level."""
    table = {}
    for mapping in (DOUBLE, SINGLE, TOP):
        for bfl in mapping.values():
            table[bfl.replace(".", "_")] = (bfl, None)
    for mapping in (DOUBLE_FUSED, SINGLE_FUSED):
        for bfl, members in mapping.items():
            table[bfl.replace(".", "_")] = (bfl, members)
    return table


def from_bfl(layers: dict[str, LoraLayer], source: str) -> dict[str, LoraLayer]:
    """A kohya Flux file's transformer layers (underscored BFL name without `lora_unet_` -> layer) as diffusers
    module path -> layer, fused modules split (`split`). LoraFileError names a module it cannot place."""
    inverse = {**{("double", v): k for k, v in DOUBLE.items()}, **{("single", v): k for k, v in SINGLE.items()},
               **{("top", v): k for k, v in TOP.items()}}
    paths, out = _bfl_paths(), {}
    for underscored, layer in layers.items():
        found = _BFL_BLOCK.fullmatch(underscored)
        kind, index, tail = (found.group(1).split("_")[0], found.group(2), found.group(3)) if found else \
            ("top", None, underscored)
        bfl, members = paths.get(tail, (None, None))
        block = f"{'transformer_blocks' if kind == 'double' else 'single_transformer_blocks'}.{index}."
        fused = {"double": DOUBLE_FUSED, "single": SINGLE_FUSED}.get(kind, {})
        if members is not None and bfl in fused:
            inner = layer.down.shape[1]
            widths = [inner] * 3 + ([layer.up.shape[0] - 3 * inner] if len(members) == 4 else [])
            for name, part in split(layer, widths, members).items():
                out[block + name] = part
        elif bfl is not None and (kind, bfl) in inverse:
            if kind == "top":
                up = _swap_halves(layer.up) if bfl == SWAPPED else layer.up
                out[inverse[(kind, bfl)]] = LoraLayer(layer.down, up, layer.alpha)
            else:
                out[block + inverse[(kind, bfl)]] = layer
        else:
            raise LoraFileError(f"{source}: lora_unet_{underscored} is no Flux.1 module kohya's layout names")
    return out
