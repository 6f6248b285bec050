"""The file-format registry (finetune/export/formats.py): every format is told from a file its own writer made,
files two formats could claim go where the detection order says, inspect and load_adapter agree, and the export
code's modules import one another in one direction only (no import circle, at module level or in a function)."""
from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import finetune.export
from finetune import adapters
from finetune.cli import main
from finetune.export import formats
from finetune.export.adapter_files import Embeddings
from finetune.export.describe import describe
from finetune.export.lora.layers import AdapterFile, LoraLayer, LoraWeights
from finetune.io.safetensors_io import read_header

EXPORT = Path(finetune.export.__file__).parent
MODULE = "down_blocks.0.attentions.0.proj_in"


def _lora() -> LoraWeights:
    generator = torch.Generator().manual_seed(0)
    layer = LoraLayer(torch.randn(2, 8, generator=generator), torch.randn(8, 2, generator=generator), 1.0)
    return LoraWeights({"unet": {MODULE: layer}}, {"finetune.base_model": "tiny"})


def _transformer_lora() -> LoraWeights:
    """A transformer LoRA whose header names the first family with a ComfyUI layout (its own names, or the
    diffusers names it keeps)."""
    import json

    from finetune.models import specs

    spec = next(spec for spec in specs().values() if spec.comfyui_names is not None)
    first_block = next(iter(spec.comfyui_names.blocks), "transformer_blocks")
    module = f"{first_block}.0.attn.to_out.0" if not spec.comfyui_names.blocks else next(
        f"{listed}.0.{tail}" for listed, renamed in spec.comfyui_names.renamed.items() for tail in renamed)
    generator = torch.Generator().manual_seed(0)
    layer = LoraLayer(torch.randn(2, 8, generator=generator), torch.randn(8, 2, generator=generator), 2.0)
    header = {"finetune.base_model": "tiny", "finetune.strategy": "lora",
              "finetune.recipe": json.dumps({"model": {"family": spec.name}})}
    return LoraWeights({"transformer": {module: layer}}, header)


def _loha() -> AdapterFile:
    from peft import LoHaConfig

    generator = torch.Generator().manual_seed(0)
    shapes = {"hada_w1_a": (8, 2), "hada_w1_b": (2, 8), "hada_w2_a": (8, 2), "hada_w2_b": (2, 8)}
    state = {f"{MODULE}.{role}": torch.randn(*shape, generator=generator) for role, shape in shapes.items()}
    config = LoHaConfig(r=2, alpha=2, target_modules=[MODULE]).to_dict()
    return AdapterFile("loha", {"unet": state}, {"unet": config}, {"finetune.base_model": "tiny"})


def _embedding(token: str) -> Embeddings:
    return Embeddings({token: torch.randn(2, 8, generator=torch.Generator().manual_seed(0))})


# (name, layout) -> how a file of that format is made: its own writer, or by hand where training alone writes it
MAKERS = {
    ("lora", "diffusers"): lambda path: formats.writer("lora", "diffusers").write(_lora(), path),
    ("lora", "kohya"): lambda path: formats.writer("lora", "kohya").write(_lora(), path),
    ("lora", "comfyui"): lambda path: formats.writer("lora", "comfyui").write(_transformer_lora(), path),
    ("lycoris", "kohya"): lambda path: formats.writer("lora_variant", "kohya").write(_loha(), path),
    ("peft_adapter", "diffusers"): lambda path: formats.writer("lora_variant", "diffusers").write(_loha(), path),
    ("textual_inversion", "diffusers"): lambda path: formats.writer("embedding", "diffusers").write(
        _embedding("<sks>"), path),
    ("sdxl_embedding", None): lambda path: save_file(
        {"clip_l": torch.zeros(1, 8), "clip_g": torch.zeros(1, 16)}, str(path)),
    ("a1111_embedding", "kohya"): lambda path: formats.writer("embedding", "kohya").write(_embedding("sks"), path),
    ("hypernetwork", None): lambda path: save_file(
        {"8.k.linear.0.weight": torch.zeros(16, 8), "8.v.linear.0.weight": torch.zeros(16, 8)}, str(path)),
    ("single_file", None): lambda path: save_file(
        {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(path)),
}


def _made(key: tuple[str, str | None], folder: Path) -> Path:
    path = folder / f"{key[0]}_{key[1]}.safetensors"
    MAKERS[key](path)
    return path


def test_every_registered_format_has_a_file_here():
    assert {(f.name, f.layout) for f in formats.FORMATS} == set(MAKERS)


def test_the_detection_order():
    # adapters.py's order from before the registry; the checkpoint, no adapter, is tried last
    assert formats.names() == ["lora", "lycoris", "peft_adapter", "sdxl_embedding", "textual_inversion",
                               "a1111_embedding", "hypernetwork", "single_file"]
    assert formats.names(loadable=True) == formats.names()[:-1]


@pytest.mark.parametrize("key", list(MAKERS), ids=lambda key: f"{key[0]}-{key[1]}")
def test_each_format_detects_its_own_files_and_reads_back_what_it_wrote(key, tmp_path):
    path = _made(key, tmp_path)
    found = formats.detect(path)
    assert (found.name, found.layout) == key
    if found.read is not None and found.write is not None:
        again = tmp_path / "again.safetensors"
        found.write(found.read(path), again)
        assert (formats.detect(again).name, formats.detect(again).layout) == key


@pytest.mark.parametrize("key", list(MAKERS), ids=lambda key: f"{key[0]}-{key[1]}")
def test_inspect_and_load_adapter_agree(key, tmp_path, monkeypatch):
    path = _made(key, tmp_path)
    found = formats.detect(path)
    info = describe(path)
    assert info["kind"] == found.describe(read_header(path))["kind"]
    assert ("finetune.load_adapter" in (info["read_by"] or "")) == (found.load is not None), info["kind"]
    # load_adapter goes through the registry: each loader here only says which format it is
    monkeypatch.setattr(formats, "FORMATS", [
        dataclasses.replace(f, load=None if f.load is None else lambda *_, f=f: f"{f.name}/{f.layout}")
        for f in formats.FORMATS])
    if found.load is None:
        with pytest.raises(ValueError, match="not an adapter format finetune knows"):
            adapters.load_adapter(None, path)
    else:
        assert adapters.detect_format(path) == found.name
        assert adapters.load_adapter(None, path) == f"{found.name}/{found.layout}"


AMBIGUOUS = {
    # kohya names, but LoHa tensors: LyCORIS, even where the header says the LoRA strategy made it
    "lycoris-before-lora": ({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, {"finetune.strategy": "lora"}, "lycoris"),
    # a LoHa in the LoRA file's layout: the variant in the header decides
    "variant-before-lora": ({"unet.x.hada_w1_a": torch.zeros(2, 2)},
                            {"finetune.strategy": "lora", "finetune.variant": "loha"}, "peft_adapter"),
    # the header says LoRA: LoRA is tried before the embeddings, whose keys have no dots either
    "lora-before-embedding": ({"x": torch.zeros(2, 2)}, {"finetune.strategy": "lora"}, "lora"),
    # AUTOMATIC1111's one key is not a diffusers token, whatever the header says
    "a1111-one-key": ({"emb_params": torch.zeros(2, 8)}, {"finetune.strategy": "textual_inversion"},
                      "a1111_embedding"),
    # a hypernetwork's header, but tokens for keys: the embedding is tried first
    "embedding-before-hypernetwork": ({"<sks>": torch.zeros(2, 8)}, {"finetune.hypernetwork": "{}"},
                                      "textual_inversion"),
}


@pytest.mark.parametrize("case", list(AMBIGUOUS))
def test_files_two_formats_could_claim_go_by_the_order(case, tmp_path):
    tensors, metadata, expected = AMBIGUOUS[case]
    path = tmp_path / "file.safetensors"
    save_file(tensors, str(path), metadata)
    assert formats.detect(path).name == expected


def test_an_unknown_file_is_refused_clearly_everywhere(tmp_path, capsys):
    path = tmp_path / "weights.safetensors"
    save_file({"encoder.weight": torch.zeros(2)}, str(path))
    with pytest.raises(formats.UnknownFormatError, match="not a file format finetune knows .formats: lora, "):
        formats.detect(path)
    with pytest.raises(ValueError, match="not an adapter format finetune knows .formats: lora, lycoris, "
                                         "peft_adapter, sdxl_embedding, textual_inversion, a1111_embedding, hypernetwork.$"):
        adapters.detect_format(path)
    assert describe(path)["kind"] == "safetensors weights of an unknown kind"
    assert main(["convert", str(path), str(tmp_path / "out.safetensors"), "--to", "kohya"]) == 2
    assert "neither a LoRA nor a textual-inversion embedding" in capsys.readouterr().err


def test_inspect_names_kohya_components_from_the_kohya_table(tmp_path):
    path = tmp_path / "sdxl.safetensors"
    stem = "text_model_encoder_layers_0_self_attn_q_proj"
    save_file({f"lora_te{n}_{stem}.lora_{role}.weight": torch.zeros(2, 2) for n in (1, 2) for role in ("down", "up")},
              str(path))
    assert set(describe(path)["lora"]) == {"text_encoder", "text_encoder_2"}


def _key(path: Path) -> tuple[str, str | None]:
    found = formats.detect(path)
    return found.name, found.layout


def test_a_run_writes_the_files_its_formats_ask_for(tmp_path):
    from finetune.export.lora.files import write_lora_files

    loha = _loha()
    lora = {"unet": {f"{MODULE}.lora_A.weight": torch.zeros(2, 8), f"{MODULE}.lora_B.weight": torch.zeros(8, 2)}}
    lora_config = {"unet": {"r": 2, "lora_alpha": 2, "target_modules": [MODULE]}}
    for variant, states, configs, asked, expected in (
            ("lora", lora, lora_config, ["diffusers"], [("lora", "diffusers")]),
            ("lora", lora, lora_config, ["diffusers", "kohya"], [("lora", "diffusers"), ("lora", "kohya")]),
            ("loha", loha.states, loha.configs, ["diffusers", "kohya"],
             [("peft_adapter", "diffusers"), ("lycoris", "kohya")])):
        run = tmp_path / f"{variant}_{len(asked)}"
        first = write_lora_files(run, states, configs, {"finetune.variant": variant}, variant, asked)
        assert first == run / "pytorch_lora_weights.safetensors"
        kohya_file = run / "kohya" / f"{run.name}.safetensors"  # named after the run, as the UIs show it
        assert [_key(first)] + ([_key(kohya_file)] if kohya_file.exists() else []) == expected


def _export_modules() -> dict[str, Path]:
    root = EXPORT.parent.parent
    modules = {}
    for path in sorted(EXPORT.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imported(module: str, path: Path, known: set[str]) -> set[str]:
    """The export modules `module` imports anywhere in its file (module level or inside a function), with the
    packages importing them runs on the way."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0]
                base = f"{anchor}.{base}" if base else anchor
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            found.update(name for name in (".".join(parts[:i]) for i in range(1, len(parts) + 1))
                         if name in known and name != module)
    return found


def test_export_modules_import_one_another_in_one_direction():
    modules = _export_modules()
    graph = {module: _imported(module, path, set(modules)) for module, path in modules.items()}
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for other in sorted(graph[module]):
            assert state.get(other) != "open", f"import circle: {' -> '.join(trail + [module, other])}"
            if other not in state:
                visit(other, trail + [module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert graph["finetune.export.lora.layers"] == set(), "the data model builds on nothing else of export"
    # describe.py (what `finetune inspect` says of a file) describes through the registry, above it
    assert not [m for m, imports in graph.items() if "finetune.export.formats" in imports
                and m != "finetune.export.describe"], "the registry sits on top: no format module imports it"
    assert "finetune.export.describe" not in set().union(*graph.values()), "nothing in export/ builds on describe"


def test_each_export_module_imports_alone():
    # one interpreter, finetune's modules forgotten before each import: each one alone must import
    modules = sorted(_export_modules())
    script = ("import importlib, sys\n"
              "for name in sys.argv[1:]:\n"
              "    for loaded in [m for m in sys.modules if m == 'finetune' or m.startswith('finetune.')]:\n"
              "        del sys.modules[loaded]\n"
              "    importlib.import_module(name)\n")
    result = subprocess.run([sys.executable, "-c", script, *modules], cwd=EXPORT.parent.parent,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
