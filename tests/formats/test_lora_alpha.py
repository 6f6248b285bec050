"""Each layer of a LoRA file keeps its own alpha on every path that reads one (issue 19, case 06-07-kohya-alpha):
kohya files may carry a different alpha per layer (block-wise training, resized files), and a layer without
alpha takes its rank (kohya's convention). The expected change of every module is computed by hand from the
file's raw tensors, `up @ down * alpha / rank`, and compared with what each path applies."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import finetune
from finetune.cli import main
from finetune.export.lora.files import read_lora
from tests.helpers import applied_changes, kohya_stem, pipeline


@pytest.fixture(scope="module")
def mixed_alpha(lora_file, tmp_path_factory) -> dict:
    """The shared LoRA (U-Net with 3x3 convs, and text encoder) as a kohya file whose modules have alpha 1, 8 or
    none in turn; and the change each module should get, by hand."""
    folder = tmp_path_factory.mktemp("alpha")
    kohya = folder / "kohya.safetensors"
    assert main(["convert", str(lora_file), str(kohya), "--to", "kohya"]) == 0
    tensors = load_file(kohya)
    stems = sorted({k.rsplit(".", 2)[0] for k in tensors if k.endswith(".lora_down.weight")})
    mixed, expected = {}, {}
    for i, stem in enumerate(stems):
        down, up = tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"]
        mixed[f"{stem}.lora_down.weight"], mixed[f"{stem}.lora_up.weight"] = down, up
        alpha = (1.0, 8.0, None)[i % 3]
        if alpha is not None:
            mixed[f"{stem}.alpha"] = torch.tensor(alpha)
        rank = down.shape[0]
        product = up.reshape(up.shape[0], -1).float() @ down.reshape(rank, -1).float()
        expected[stem] = (product * ((alpha if alpha is not None else rank) / rank)).reshape(
            up.shape[0], *down.shape[1:])
    path = folder / "mixed_alpha.safetensors"
    save_file(mixed, str(path))
    assert len(stems) >= 6  # every kind of alpha on both components
    return {"path": path, "expected": expected}


def assert_changes(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert set(got) == set(expected)
    for stem, change in expected.items():
        torch.testing.assert_close(got[stem].reshape(change.shape), change, atol=atol, rtol=1e-4, msg=stem)


def test_load_adapter_applies_each_layers_alpha(mixed_alpha, tiny_base):
    pipe = pipeline(tiny_base)
    name = finetune.load_adapter(pipe, mixed_alpha["path"])
    assert_changes(applied_changes(pipe, name), mixed_alpha["expected"])


def test_convert_then_load_keeps_each_layers_alpha(mixed_alpha, tiny_base, tmp_path):
    converted = tmp_path / "diffusers.safetensors"
    assert main(["convert", str(mixed_alpha["path"]), str(converted), "--to", "diffusers"]) == 0
    read = read_lora(converted)
    assert_changes({kohya_stem(c, m): layer.delta() for c, m, layer in read.modules()}, mixed_alpha["expected"])
    pipe = pipeline(tiny_base)
    assert_changes(applied_changes(pipe, finetune.load_adapter(pipe, converted)), mixed_alpha["expected"])


def test_resize_keeps_each_layers_alpha(mixed_alpha, tmp_path):
    resized = tmp_path / "resized.safetensors"
    # rank 4 is every layer's own or more: nothing is cut, so each change must stay as it was
    assert main(["resize", str(mixed_alpha["path"]), str(resized), "--rank", "4"]) == 0
    read = read_lora(resized)
    assert_changes({kohya_stem(c, m): layer.delta() for c, m, layer in read.modules()}, mixed_alpha["expected"],
                   atol=1e-4)


def test_merge_adds_each_layers_own_change(mixed_alpha, tiny_base, tmp_path):
    assert main(["merge", "--base", str(tiny_base), "--lora", str(mixed_alpha["path"]), "--out",
                 str(tmp_path / "merged"), "--save-dtype", "fp32"]) == 0
    base, merged = pipeline(tiny_base), pipeline(tmp_path / "merged")
    got = {}
    for component in ("unet", "text_encoder"):
        before = dict(getattr(base, component).named_modules())
        for module, layer in getattr(merged, component).named_modules():
            stem = kohya_stem(component, module)
            if stem in mixed_alpha["expected"]:
                got[stem] = layer.weight.detach() - before[module].weight.detach()
    assert_changes(got, mixed_alpha["expected"], atol=1e-4)


def test_training_starts_from_each_layers_alpha(mixed_alpha, tiny_base):
    from finetune.models.stable_diffusion import StableDiffusion
    from finetune.strategies.lora import Options, Strategy

    family = StableDiffusion()
    parts = family.load(str(tiny_base))
    strategy = Strategy(Options(kind="lora", initial_weights=str(mixed_alpha["path"]), text_encoder=True))
    strategy.check(family, parts)
    strategy.prepare(family, parts)
    assert_changes(applied_changes(parts, "default"), mixed_alpha["expected"])
