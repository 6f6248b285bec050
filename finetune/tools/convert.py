"""`finetune convert IN OUT --to diffusers|kohya`: move a LoRA or an embedding between the formats UIs read.

- LoRA: diffusers/peft (`pipe.load_lora_weights`) <-> kohya (`lora_unet_...`, AUTOMATIC1111, ComfyUI). The
  training metadata travels; a kohya file gets the `ss_*` figures derived from it.
- LoHa, LoKr: peft's layout (`finetune.load_adapter`) <-> LyCORIS's (`lora_unet_....hada_w1_a`, AUTOMATIC1111,
  ComfyUI), finetune/export/lycoris.py.
- Textual inversion: diffusers `{token: vectors}` <-> AUTOMATIC1111/kohya `{"emb_params": vectors}` (the file
  name is the prompt word), also from AUTOMATIC1111's pickled `.pt` (read only if it is plain data).
"""
from __future__ import annotations

from pathlib import Path

from finetune.export.lora_layers import LoraFileError, is_kohya, read_tensors, tensor_names

TARGETS = ("diffusers", "kohya")


def _module_names(base: str | None) -> dict[str, list[str]] | None:
    """The base model's module paths, to resolve kohya's underscored names exactly (None: parse them)."""
    if base is None:
        return None
    from finetune.export.kohya_lora import module_paths
    from finetune.models import family_for

    return module_paths(family_for("auto", base, hub=True).load(base))


def convert(source: str | Path, out: str | Path, to: str, base: str | None = None,
            token: str | None = None) -> str:
    """Write `out` in the `to` format; returns a line saying what was converted."""
    source, out = Path(source), Path(out)
    if to not in TARGETS:
        raise LoraFileError(f"--to: one of {', '.join(TARGETS)}, got {to!r}")
    if out.suffix != ".safetensors":
        raise LoraFileError(f"{out}: the output should end in .safetensors (finetune never writes pickles)")
    if source.suffix == ".pt":
        return _embedding_from_a1111_pt(source, out, to, token)
    keys = tensor_names(source)  # the header alone tells a LoRA from an embedding
    from finetune.export import lycoris, peft_adapter
    from finetune.export.safetensors_io import read_metadata

    if lycoris.is_lycoris(keys) or peft_adapter.is_peft_adapter(read_metadata(source), keys):
        return _loha_lokr(source, out, to, base)
    if is_kohya(keys) or any(".lora_A." in k or ".lora.down." in k for k in keys):
        return _lora(source, out, to, base)
    if keys == ["emb_params"] or (keys and not any("." in k for k in keys)):
        return _embedding(*read_tensors(source), source, out, to, token)
    raise LoraFileError(f"{source}: neither a LoRA nor a textual-inversion embedding; `finetune inspect "
                        f"{source}` says what it is (hypernetworks and checkpoints have one format here)")


def _lora(source: Path, out: Path, to: str, base: str | None) -> str:
    from finetune.export import kohya_lora, lora_layers

    weights = lora_layers.read_lora(source, _module_names(base))
    if to == "kohya":
        kohya_lora.write_kohya(weights, out)
    else:
        lora_layers.write_diffusers(weights, out)
    counts = ", ".join(f"{len(layers)} {component} layers" for component, layers in weights.layers.items())
    return f"LoRA ({weights.format} -> {to}, {counts}): wrote {out}"


def _loha_lokr(source: Path, out: Path, to: str, base: str | None) -> str:
    """LoHa / LoKr between peft's layout (finetune.load_adapter) and LyCORIS's (AUTOMATIC1111, ComfyUI)."""
    from finetune.export import diffusers_lora, lycoris, peft_adapter

    tensors, metadata = read_tensors(source)
    if lycoris.is_lycoris(list(tensors)):
        variant, states, configs = lycoris.from_lycoris(tensors, str(source), _module_names(base))
        plain = {c: config.to_dict() for c, config in configs.items()}
        origin = "lycoris"
    else:
        variant, states = metadata[peft_adapter.VARIANT_KEY], diffusers_lora.unpack(tensors)
        plain = {c: config.to_dict() for c, config in peft_adapter.configs_from_metadata(metadata, str(source)).items()}
        origin = "peft"
    if variant == "oft":
        raise LoraFileError(f"{source}: an OFT adapter has no kohya or LyCORIS layout that AUTOMATIC1111 or "
                            "ComfyUI apply; keep it in finetune's format (finetune.load_adapter reads it)")
    header = {k: v for k, v in metadata.items() if k not in (peft_adapter.PEFT_CONFIG_KEY, "format")}
    if to == "kohya":
        lycoris.write_lycoris(variant, states, plain, out, header)
    else:
        peft_adapter.save_peft_adapter(out, states, plain, {**header, peft_adapter.VARIANT_KEY: variant})
    counts = ", ".join(f"{len({k.rpartition('.')[0] for k in s})} {c} modules" for c, s in states.items())
    return f"{variant} ({origin} -> {'lycoris' if to == 'kohya' else 'peft'}, {counts}): wrote {out}"


def _embedding(tensors: dict, metadata: dict[str, str], source: Path, out: Path, to: str,
               token: str | None) -> str:
    from finetune.export.safetensors_io import save_safetensors
    from finetune.export.textual_inversion import A1111_KEY, a1111_name

    if list(tensors) == [A1111_KEY]:
        found = {token or source.stem: tensors[A1111_KEY]}  # AUTOMATIC1111 names an embedding after its file
    else:
        found = dict(tensors)
    if to == "diffusers":
        save_safetensors(found, out, metadata)
        return f"embedding {', '.join(found)} -> diffusers: wrote {out}"
    if token is not None and token not in found:
        raise LoraFileError(f"--token: {token!r} is not in {source} (it holds {', '.join(found)})")
    chosen = token or next(iter(found))
    if len(found) > 1 and token is None:
        raise LoraFileError(f"{source} holds {len(found)} tokens ({', '.join(found)}) and a kohya/AUTOMATIC1111 "
                            "file holds one; pick it with --token")
    save_safetensors({A1111_KEY: found[chosen]}, out, metadata)
    hint = "" if out.stem == a1111_name(chosen) else f" (AUTOMATIC1111 will call it {out.stem!r}, after the file)"
    return f"embedding {chosen} -> kohya/AUTOMATIC1111: wrote {out}{hint}"


def _embedding_from_a1111_pt(source: Path, out: Path, to: str, token: str | None) -> str:
    from finetune.export.safetensors_io import save_safetensors
    from finetune.export.textual_inversion import A1111_KEY, read_a1111_pt

    name, vectors = read_a1111_pt(source)
    if to == "kohya":
        save_safetensors({A1111_KEY: vectors}, out, {"finetune.converted_from": source.name})
    else:
        save_safetensors({token or name: vectors}, out, {"finetune.converted_from": source.name})
    return f"AUTOMATIC1111 embedding {name} -> {to}: wrote {out}"
