"""`finetune convert IN OUT --to diffusers|kohya`: move a LoRA or an embedding between the formats UIs read.

- LoRA: diffusers/peft (`pipe.load_lora_weights`) <-> kohya (`lora_unet_...`, AUTOMATIC1111, ComfyUI). The
  training metadata travels; a kohya file gets the `ss_*` figures derived from it.
- LoHa, LoKr: peft's layout (`finetune.load_adapter`) <-> LyCORIS's (`lora_unet_....hada_w1_a`, AUTOMATIC1111,
  ComfyUI), finetune/export/lora/lycoris.py.
- Textual inversion: diffusers `{token: vectors}` <-> AUTOMATIC1111/kohya `{"emb_params": vectors}` (the file
  name is the prompt word), also from AUTOMATIC1111's pickled `.pt` (read only if it is plain data).

Which format the input is, how it is read and how the output is written are the format registry's
(finetune/export/formats.py): a file converts to the format of its family that `--to` names.
"""
from __future__ import annotations

from pathlib import Path

from finetune.export import formats
from finetune.export.adapter_files import Embeddings
from finetune.export.lora.files import check_path
from finetune.export.lora.layers import LoraFileError

TARGETS = ("diffusers", "kohya", "comfyui")


def _module_names(base: str | None) -> dict[str, list[str]] | None:
    """The base model's module paths, to resolve kohya's underscored names exactly (None: parse them)."""
    if base is None:
        return None
    from finetune.export.lora.kohya import module_paths
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
    check_path(source)
    try:
        found = formats.detect(source)  # the header alone tells a LoRA from an embedding
    except formats.UnknownFormatError:
        found = None
    by_family = {"lora": _lora, "lora_variant": _loha_lokr, "embedding": _embedding}
    if found is None or found.family not in by_family:
        raise LoraFileError(f"{source}: neither a LoRA nor a textual-inversion embedding; `finetune inspect "
                            f"{source}` says what it is (hypernetworks and checkpoints have one format here)")
    return by_family[found.family](found, source, out, to, base, token)


def _lora(found: formats.FileFormat, source: Path, out: Path, to: str, base: str | None, token: str | None) -> str:
    weights = found.read(source, _module_names(base))
    formats.writer("lora", to).write(weights, out)
    counts = ", ".join(f"{len(layers)} {component} layers" for component, layers in weights.layers.items())
    return f"LoRA ({weights.format} -> {to}, {counts}): wrote {out}"


def _loha_lokr(found: formats.FileFormat, source: Path, out: Path, to: str, base: str | None,
               token: str | None) -> str:
    """LoHa / LoKr between peft's layout (finetune.load_adapter) and LyCORIS's (AUTOMATIC1111, ComfyUI)."""
    # only LyCORIS's kohya names need the base's module paths
    adapter = found.read(source, _module_names(base) if found.layout == "kohya" else None)
    if adapter.variant == "oft":
        raise LoraFileError(f"{source}: an OFT adapter has no kohya or LyCORIS layout that AUTOMATIC1111 or "
                            "ComfyUI apply; keep it in finetune's format (finetune.load_adapter reads it)")
    formats.writer("lora_variant", to).write(adapter, out)
    origin = "lycoris" if found.layout == "kohya" else "peft"
    counts = ", ".join(f"{len({k.rpartition('.')[0] for k in s})} {c} modules" for c, s in adapter.states.items())
    return f"{adapter.variant} ({origin} -> {'lycoris' if to == 'kohya' else 'peft'}, {counts}): wrote {out}"


def _embedding(found: formats.FileFormat, source: Path, out: Path, to: str, base: str | None,
               token: str | None) -> str:
    from finetune.export.textual_inversion import a1111_name

    embeddings = found.read(source)
    tokens = embeddings.tokens
    if found.layout == "kohya" and token:  # AUTOMATIC1111's word is the file's name; --token gives another
        tokens = {token: vectors for vectors in tokens.values()}
    if to == "diffusers":
        formats.writer("embedding", to).write(Embeddings(tokens, embeddings.metadata), out)
        return f"embedding {', '.join(tokens)} -> diffusers: wrote {out}"
    if token is not None and token not in tokens:
        raise LoraFileError(f"--token: {token!r} is not in {source} (it holds {', '.join(tokens)})")
    chosen = token or next(iter(tokens))
    if len(tokens) > 1 and token is None:
        raise LoraFileError(f"{source} holds {len(tokens)} tokens ({', '.join(tokens)}) and a kohya/AUTOMATIC1111 "
                            "file holds one; pick it with --token")
    formats.writer("embedding", to).write(Embeddings({chosen: tokens[chosen]}, embeddings.metadata), out)
    hint = "" if out.stem == a1111_name(chosen) else f" (AUTOMATIC1111 will call it {out.stem!r}, after the file)"
    return f"embedding {chosen} -> kohya/AUTOMATIC1111: wrote {out}{hint}"


def _embedding_from_a1111_pt(source: Path, out: Path, to: str, token: str | None) -> str:
    from finetune.export.textual_inversion import read_a1111_pt

    name, vectors = read_a1111_pt(source)
    word = name if to == "kohya" else token or name  # the kohya file's word is its file name
    formats.writer("embedding", to).write(Embeddings({word: vectors}, {"finetune.converted_from": source.name}), out)
    return f"AUTOMATIC1111 embedding {name} -> {to}: wrote {out}"
