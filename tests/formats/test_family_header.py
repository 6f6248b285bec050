"""Every file a run writes carries the header keys other programs tell the base family by (issue 32, part 6;
finetune/export/family_header.py). What they do with them, written here as the facts:
- AUTOMATIC1111 (extensions-builtin/Lora/network.py `NetworkOnDisk.detect_version`): SDXL when
  ss_base_model_version starts with "sdxl_", else SD2 when ss_v2 == "True", else SD1 when the file has a header;
  its Lora page hides a network of another version than the loaded model's.
- Forge (extensions-builtin/sd_forge_lora/network.py `detect_version`): Flux when modelspec.implementation is
  Black Forest Labs' repository or modelspec.architecture is "flux-1-dev/lora"; SDXL when the architecture is
  "stable-diffusion-xl-v1-base/lora" or ss_base_model_version starts with "sdxl_"; then AUTOMATIC1111's rules.
A run per family x strategy (one step each) writes the files; every .safetensors file among them is checked.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from finetune.io.safetensors_io import read_metadata
from finetune.models.tiny import save_tiny_pipeline
from finetune.recipe.load import parse_recipe
from tests.helpers import draw_concept, recipe_dict, train_keeping_parts

LORA = {"kind": "lora", "rank": 4, "alpha": 2.0, "text_encoder": True}
CASES = {
    "sd-lora": ("sd", {**LORA, "formats": ["diffusers", "kohya"]}),
    "sd-lokr": ("sd", {**LORA, "variant": "lokr", "formats": ["diffusers", "kohya"]}),
    "sd-hypernetwork": ("sd", {"kind": "hypernetwork", "layer_structure": [1, 2, 1]}),
    "sdxl-lora": ("sdxl", {**LORA, "formats": ["diffusers", "kohya"]}),
    "sdxl-loha": ("sdxl", {**LORA, "variant": "loha", "formats": ["diffusers", "kohya"]}),
    "sdxl-embedding": ("sdxl", {"kind": "textual_inversion", "placeholder_token": "<sks>",
                                "initializer_token": "x"}),
    "sd3-lora": ("sd3", {**LORA, "formats": ["diffusers", "kohya"]}),
    "flux-lora": ("flux", {**LORA, "formats": ["diffusers", "kohya"]}),
    "zimage-lora": ("zimage", {"kind": "lora", "rank": 4, "alpha": 2.0}),
}
# the tiny SD's U-Net is SD1-shaped (its width is no released one's), so SD1 is what a UI should take it for
VERSIONS = {"sd": "sd_v1", "sdxl": "sdxl_base_v1-0", "sd3": "sd3", "flux": "flux1", "zimage": "zimage"}
ARCHITECTURES = {"sd": "stable-diffusion-v1", "sdxl": "stable-diffusion-xl-v1-base", "sd3": "stable-diffusion-3",
                 "flux": "flux-1-dev", "zimage": "z-image"}
SUFFIXES = {"lora": "/lora", "textual_inversion": "/textual-inversion", "hypernetwork": "/hypernetwork"}


def a1111_version(header: dict[str, str]) -> str:
    if str(header.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(header.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if header else "Unknown"


def forge_version(header: dict[str, str]) -> str:
    if header.get("modelspec.implementation") == "https://github.com/black-forest-labs/flux" or \
            header.get("modelspec.architecture") == "flux-1-dev/lora":
        return "Flux"
    if header.get("modelspec.architecture") == "stable-diffusion-xl-v1-base/lora":
        return "SDXL"
    return a1111_version(header)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bases")
    return {family: save_tiny_pipeline(folder / family, family=family) for family in VERSIONS}


@pytest.mark.parametrize("case", CASES)
def test_every_file_a_run_writes_tells_its_family(case, bases, tmp_path):
    family, strategy = CASES[case]
    images = draw_concept(tmp_path / "images")
    recipe = parse_recipe(recipe_dict(bases[family], images, tmp_path / case, strategy=strategy,
                                      train={"max_steps": 1, "batch_size": 1}))
    train_keeping_parts(recipe)
    files = sorted(Path(tmp_path / case).rglob("*.safetensors"))
    files = [f for f in files if "checkpoints" not in f.parts]
    expected_files = 2 if "formats" in strategy or strategy["kind"] == "textual_inversion" else 1
    assert len(files) == expected_files, files
    for path in files:
        header = read_metadata(path)
        assert header["ss_base_model_version"] == VERSIONS[family], path
        assert header["modelspec.architecture"] == ARCHITECTURES[family] + SUFFIXES[strategy["kind"]], path
        assert header["ss_v2"] == "False", path
        if family in ("sd", "sdxl"):
            assert a1111_version(header) == forge_version(header) == {"sd": "SD1", "sdxl": "SDXL"}[family], path
        if family == "flux":
            assert forge_version(header) == "Flux", path
