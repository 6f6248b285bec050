"""`finetune merge`: adapters fused into the base at their ratios, saved as a diffusers folder or one checkpoint."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from finetune import load_adapter
from finetune.cli import main
from finetune.models.stable_diffusion import StableDiffusion
from finetune.tools.merge import parse_adapter_argument
from tests.helpers import images as _images, pipeline as _pipe


def _with_adapter(tiny_base, path, scale):
    pipe = _pipe(tiny_base)
    load_adapter(pipe, path, scale=scale)
    return pipe


def _from_parts(parts):
    return StableDiffusion().pipeline(parts)


def test_merged_folder_predicts_as_base_plus_lora_at_its_ratio(tiny_base, lora_file, tmp_path):
    out = tmp_path / "merged"
    assert main(["merge", "--base", str(tiny_base), "--lora", f"{lora_file}:0.7", "--out", str(out),
                 "--save-dtype", "fp32"]) == 0
    merged = _from_parts(StableDiffusion().load(str(out)))
    assert not any("lora" in name for name, _ in merged.unet.named_modules())  # plain layers, no peft
    expected = _images(_with_adapter(tiny_base, lora_file, 0.7))
    assert np.abs(expected - _images(_pipe(tiny_base))).max() > 0.05
    np.testing.assert_allclose(_images(merged), expected, atol=1e-4)
    assert (out / "finetune.json").is_file() and not list(tmp_path.glob(".merged*"))


def test_merged_single_file_checkpoint_loads_as_users_load_it(tiny_base, lora_file, tmp_path):
    out = tmp_path / "merged.safetensors"
    assert main(["merge", "--base", str(tiny_base), "--lora", str(lora_file), "--out", str(out),
                 "--save-dtype", "fp32"]) == 0
    merged = _from_parts(StableDiffusion().load(str(out), config=str(tiny_base)))
    np.testing.assert_allclose(_images(merged), _images(_with_adapter(tiny_base, lora_file, 1.0)), atol=1e-4)


def test_two_loras_add_up(tiny_base, lora_file, tmp_path):
    kohya = tmp_path / "k.safetensors"
    assert main(["convert", str(lora_file), str(kohya), "--to", "kohya"]) == 0
    # the same LoRA at +0.5 (diffusers format) and -0.5 (kohya format) cancels: the base comes back
    out = tmp_path / "cancelled"
    assert main(["merge", "--base", str(tiny_base), "--lora", f"{lora_file}:0.5", "--lora", f"{kohya}:-0.5",
                 "--out", str(out), "--save-dtype", "fp32"]) == 0
    merged, base = _from_parts(StableDiffusion().load(str(out))), _pipe(tiny_base)
    for name in ("unet", "text_encoder"):
        ours, theirs = getattr(merged, name).state_dict(), getattr(base, name).state_dict()
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], atol=1e-5, rtol=0)


def test_bad_merge_arguments_exit_2(tiny_base, lora_file, tmp_path, capsys):
    assert main(["merge", "--base", str(tiny_base), "--lora", str(tmp_path / "none.safetensors"),
                 "--out", str(tmp_path / "m")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["merge", "--base", str(tiny_base), "--lora", str(lora_file), "--out", str(tmp_path / "m.ckpt")]) == 2
    assert "pickle" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.ckpt").exists()


@pytest.mark.parametrize("text, expected", [("a.safetensors", ("a.safetensors", 1.0)),
                                            ("a.safetensors:0.5", ("a.safetensors", 0.5)),
                                            ("C:\\loras\\a.safetensors", ("C:\\loras\\a.safetensors", 1.0)),
                                            ("dir/a.safetensors:-1", ("dir/a.safetensors", -1.0))])
def test_lora_argument_takes_an_optional_ratio(text, expected):
    assert parse_adapter_argument(text) == expected
