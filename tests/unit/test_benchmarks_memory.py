"""benchmarks/memory.py runs and its estimates hang together: the real models' sizes (built on the meta device), 8 bits
below 16, the 16 GB recipe under 16 GB, FSDP's share falling with the GPU count, checkpointing and the caches saving
what they should; Flux.2, Qwen-Image, Chroma, Lumina 2, Sana, HiDream-I1, Krea 2 and Qwen-Image 2.1 at their
released sizes, and their recipes where the family's recipes/ file is there. Fast: meta-device models and an
activation measurement on two-head blocks."""
from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import activations, memory
from tests.helpers import declares_data_control

RECIPES = Path(__file__).parents[2] / "recipes"


@pytest.fixture(scope="module")
def table():
    return memory.rows(fsdp=(1, 2, 4, 8))


def _estimate(name: str, model: str = "flux-dev", *overrides: str, fsdp: int = 1) -> dict:
    return memory.estimate(memory.load(RECIPES / f"{name}.yaml", overrides), memory.MODELS[model], fsdp=fsdp)


def test_the_models_have_the_released_sizes():
    sizes = {key: [memory._numel(m) for m in (denoiser, *encoders, vae)]
             for key, (denoiser, encoders, vae) in ((k, memory._build(m)) for k, m in memory.MODELS.items())}
    t5, clip_l, clip_l_projected, clip_g, vae = 4_762_310_656, 123_060_480, 123_650_304, 694_659_840, 83_819_683
    assert sizes["flux-dev"] == [11_901_408_320, clip_l, t5, vae]
    assert sizes["flux-kontext-dev"] == sizes["flux-dev"]  # Kontext: Flux.1-dev's network, other weights
    assert sizes["sd35-large"] == [8_056_627_520, clip_l_projected, clip_g, t5, vae]
    assert sizes["sd35-medium"] == [2_243_171_520, clip_l_projected, clip_g, t5, vae]
    # Flux.2: dev's 32 B transformer and Mistral-Small-3.1's 24 B; klein-base-9B's 9.1 B and Qwen3-8B's 8.2 B
    flux2_vae = 84_046_115
    assert sizes["flux2-dev"] == [32_223_281_152, 24_011_361_280, flux2_vae]
    assert sizes["flux2-klein-9b"] == [9_078_581_248, 8_190_735_360, flux2_vae]
    assert sizes["qwen-image"] == [20_430_401_088, 8_292_166_656, 126_892_531]  # 20 B; Qwen2.5-VL-7B's 8.3 B
    assert sizes["chroma-hd"] == [8_899_983_424, t5, vae]  # 8.9 B, T5-XXL and Flux.1's VAE
    gemma2_2b = 2_614_341_888  # Gemma-2-2B (Gemma2Model, no lm_head): Lumina 2's and Sana's encoder
    assert sizes["lumina2"] == [2_609_769_152, gemma2_2b, vae]  # 2.6 B NextDiT, Flux.1's VAE
    assert sizes["sana-1600m"] == [1_604_462_752, gemma2_2b, 312_250_275]  # 1.6 B; DC-AE f32c32's 312 M
    # HiDream-I1: 17 B (MoE), CLIP-L and CLIP-G with projections, T5-XXL, Llama-3.1-8B's 8.0 B
    assert sizes["hidream-i1-full"] == [17_105_733_184, clip_l_projected, clip_g, t5, 8_030_261_248, vae]
    assert sizes["krea2"] == [12_820_073_036, 4_437_815_808, 126_892_531]  # Qwen3-VL-4B's 4.4 B, Qwen-Image's VAE
    # Qwen-Image 2.1: 7.1 B, Qwen3-VL-8B's 8.77 B (with its lm_head, as the pipeline loads it), the RGBA VAE's 0.34 B
    assert sizes["qwen-image-2.1"] == [7_115_124_736, 8_767_123_696, 337_740_404]


def test_the_measured_activation_ratios_are_plausible():
    for family, kinds in (("flux", {"double", "single", "rest"}), ("sd3", {"dual", "joint", "last", "rest"}),
                          ("flux2", {"double", "single", "rest"}), ("qwen_image", {"joint", "rest"}),
                          ("chroma", {"double", "single", "rest"}), ("lumina2", {"joint", "rest"}),
                          ("sana", {"joint", "rest"}), ("hidream", {"double", "single", "rest"}),
                          ("krea2", {"joint", "rest"}), ("qwen_image_2_1", {"joint", "rest"}),
                          ("flux_kontext", {"double", "single", "rest"})):
        measured = memory.ratios(family)
        assert set(measured) == kinds
        # bytes per token per unit of width: a block keeps tens of bf16 values of each token's width
        assert all(10 < measured[kind] < 200 for kind in kinds - {"rest"}), measured
    flux = memory.ratios("flux")
    assert flux["double"] > flux["single"]  # two streams, two MLPs against one fused one
    assert activations.KEPT_PER_TOKEN_WIDTH < min(flux["double"], flux["single"])
    # the kinds a real transformer's blocks are told apart by, in the order they run
    kinds = {key: [kind for kind, _ in activations.block_kinds(memory._build(memory.MODELS[key])[0])]
             for key in ("flux2-dev", "flux2-klein-9b", "qwen-image", "chroma-hd", "lumina2", "sana-1600m",
                         "hidream-i1-full", "krea2", "qwen-image-2.1")}
    assert kinds["flux2-dev"] == ["double"] * 8 + ["single"] * 48
    assert kinds["flux2-klein-9b"] == ["double"] * 8 + ["single"] * 24
    assert kinds["qwen-image"] == ["joint"] * 60
    assert kinds["chroma-hd"] == ["double"] * 19 + ["single"] * 38
    assert kinds["lumina2"] == ["joint"] * 26  # the 2 + 2 refiners are not checkpointed: "rest"
    assert kinds["sana-1600m"] == ["joint"] * 20
    assert kinds["hidream-i1-full"] == ["double"] * 16 + ["single"] * 32
    assert kinds["krea2"] == ["joint"] * 28
    assert kinds["qwen-image-2.1"] == ["joint"] * 32
    # Sana's blocks hold the image's tokens alone (32 px a token); the others both streams (16 px a token)
    assert activations.block_tokens("sana", 1024, 300) == 1024
    assert activations.block_tokens("hidream", 4096, 384) == 4096 + 384
    assert memory.MODELS["sana-1600m"].pixels_per_token == 32 and memory.MODELS["krea2"].pixels_per_token == 16
    # Qwen-Image 2.1: a 16x VAE and no packing, one token per latent pixel: 16 px a token as well
    assert memory.MODELS["qwen-image-2.1"].pixels_per_token == 16


def test_a_recipes_base_names_its_model():
    told = {base: memory._model_for(base) for base in (
        "black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.2-dev", "black-forest-labs/FLUX.2-klein-base-9B",
        "black-forest-labs/FLUX.2-klein-4B", "Qwen/Qwen-Image", "Qwen/Qwen-Image-2.1", "lodestones/Chroma1-HD",
        "stabilityai/stable-diffusion-3.5-large", "stabilityai/stable-diffusion-3.5-medium",
        "Alpha-VLLM/Lumina-Image-2.0", "Efficient-Large-Model/Sana_1600M_1024px_diffusers",
        "Efficient-Large-Model/Sana_600M_1024px_diffusers", "HiDream-ai/HiDream-I1-Full", "HiDream-ai/HiDream-I1-Dev",
        "krea/Krea-2-Raw", "black-forest-labs/FLUX.1-Kontext-dev")}
    assert list(told.values()) == ["flux-dev", "flux2-dev", "flux2-klein-9b", None, "qwen-image", "qwen-image-2.1",
                                   "chroma-hd", "sd35-large", "sd35-medium", "lumina2", "sana-1600m", None,
                                   "hidream-i1-full", "hidream-i1-full", "krea2", "flux-kontext-dev"]


def test_every_shipped_recipe_has_a_row(table):
    names = {(row["recipe"], row["model"]) for row in table}
    assert {("flux_lora", "Flux.1-dev"), ("flux_lora_16gb", "Flux.1-dev"), ("sd35_lora", "SD3.5 Medium"),
            ("sd35_lora", "SD3.5 Large")} <= names
    for row in table:
        assert row["gb"] == max(row["phases"].values()) > 0
        assert row["phases"]["training"] == pytest.approx(sum(row["parts"].values()))


def test_the_16gb_and_24gb_recipes_fit_by_the_estimate(table):
    row, = [r for r in table if r["recipe"] == "flux_lora_16gb"]
    assert row["gb"] <= 16.0 and row["quantize"] != "none"
    flux, = [r for r in table if r["recipe"] == "flux_lora"]
    assert flux["gb"] <= 24.0 and flux["quantize"] != "none"
    # what its header says: in bf16 it needs a 40 GB card, and with sample grids T5-XXL comes back past 24 GB
    assert _estimate("flux_lora", "flux-dev", "model.quantize=none")["gb"] > 24.0
    assert _estimate("flux_lora", "flux-dev", "sample.every=250")["gb"] > 24.0


def test_eight_bits_hold_the_transformer_in_half_the_memory():
    int8 = _estimate("flux_lora_16gb")
    fp8 = _estimate("flux_lora_16gb", "flux-dev", "model.quantize=fp8")
    bf16 = _estimate("flux_lora_16gb", "flux-dev", "model.quantize=none")
    assert int8["parts"]["weights"] == fp8["parts"]["weights"]
    assert int8["parts"]["weights"] == pytest.approx(bf16["parts"]["weights"] / 2, rel=0.01)
    assert int8["gb"] < bf16["gb"]
    # 8-bit matmuls keep the weights in bf16: they save time, not memory
    for kind in ("int8_w8a8", "fp8_w8a8"):
        assert _estimate("flux_lora_16gb", "flux-dev", f"model.quantize={kind}")["parts"] == bf16["parts"]


def test_checkpointing_caches_and_optimizers_change_what_they_should():
    base = _estimate("flux_lora_16gb")
    unchecked = _estimate("flux_lora_16gb", "flux-dev", "train.gradient_checkpointing=false")
    assert unchecked["parts"]["activations"] > 5 * base["parts"]["activations"]
    uncached = _estimate("flux_lora_16gb", "flux-dev", "cache.text=off")
    assert uncached["parts"]["text encoders"] > 9.0  # T5-XXL stays beside the transformer
    assert "text encoders" not in base["parts"] and "vae" not in base["parts"]
    larger = _estimate("flux_lora_16gb", "flux-dev", "data.resolution=1024", "train.batch_size=2")
    assert larger["parts"]["activations"] > 2 * base["parts"]["activations"]
    # the sample grids bring T5-XXL back: the 16 GB recipe draws none while it trains
    assert _estimate("flux_lora_16gb", "flux-dev", "sample.every=100", "sample.prompts=[a star]")["gb"] > 16.0
    lora = base["parts"]["lora+grads+optimizer"]
    assert memory._optimizer_bytes([(16, 3072)], "adamw8bit") < memory._optimizer_bytes([(16, 3072)], "adamw")
    assert memory._optimizer_bytes([(16, 3072)], "adafactor") < memory._optimizer_bytes([(16, 3072)], "adamw8bit")
    assert 0.5 < lora < 1.0  # 45 M LoRA weights of rank 16, 16 bytes each with AdamW


def test_the_sd35_recipe_fits_24gb_on_medium_and_large_needs_more(table):
    medium, large = ([r for r in table if r["recipe"] == "sd35_lora" and r["model"] == name][0]
                     for name in ("SD3.5 Medium", "SD3.5 Large"))
    assert medium["gb"] < 24.0 < large["gb"]


@pytest.mark.skipif(not (RECIPES / "flux_dreambooth_fsdp.yaml").is_file(), reason="no FSDP recipe shipped")
def test_the_fsdp_share_falls_with_the_gpu_count(table):
    rows = sorted((r for r in table if r["recipe"] == "flux_dreambooth_fsdp"), key=lambda r: r["gpus"])
    assert [r["gpus"] for r in rows] == [1, 2, 4, 8]
    shards = [r["parts"]["weights+grads+optimizer"] for r in rows]
    assert all(a > b for a, b in zip(shards, shards[1:]))
    assert shards[0] == pytest.approx(11_901_408_320 * 16 / 1e9, rel=0.01)  # fp32 weights, grads, AdamW x2
    peaks = [r["gb"] for r in rows]
    assert all(a >= b for a, b in zip(peaks, peaks[1:]))


def _shipped(*names: str):
    """Skips a test until the family's recipes are in recipes/ (they come with the family's branch)."""
    missing = [name for name in names if not (RECIPES / f"{name}.yaml").is_file()]
    return pytest.mark.skipif(bool(missing), reason=f"not in recipes/ yet: {', '.join(missing)}")


@_shipped("flux2_klein_lora", "qwen_image_lora", "chroma_lora")
def test_the_new_families_24gb_recipes_fit_by_the_estimate(table):
    for recipe, model in (("flux2_klein_lora", "Flux.2 klein 9B"), ("qwen_image_lora", "Qwen-Image"),
                          ("chroma_lora", "Chroma1-HD")):
        row, = [r for r in table if r["recipe"] == recipe]
        assert row["model"] == model and row["quantize"] != "none" and row["gradient_checkpointing"]
        assert row["gb"] <= 24.0, row
    # what their headers say: sample grids bring Qwen3-8B / Qwen2.5-VL back past 24 GB, and Qwen-Image in bf16
    # needs far more than 24 GB
    assert _estimate("flux2_klein_lora", "flux2-klein-9b", "sample.every=250")["gb"] > 24.0
    assert _estimate("qwen_image_lora", "qwen-image", "sample.every=250")["gb"] > 24.0
    assert _estimate("qwen_image_lora", "qwen-image", "model.quantize=none")["gb"] > 40.0
    # Qwen-Image's 20.4 B int8 transformer is most of it; 1328 px (the model's own size) is past 24 GB
    assert _estimate("qwen_image_lora", "qwen-image", "data.resolution=1328")["gb"] > 24.0


@_shipped("flux2_lora")
def test_the_flux2_dev_recipe_needs_more_than_24gb(table):
    row, = [r for r in table if r["recipe"] == "flux2_lora"]
    assert row["model"] == "Flux.2-dev" and row["quantize"] != "none"
    assert row["parts"]["weights"] > 32.0  # the 32.2 B transformer in 8 bits
    assert row["phase"] == "caching" and row["gb"] > 48.0  # Mistral-Small-3.1's 24 B in bf16 caches the prompts


@_shipped("lumina2_lora")
def test_the_lumina2_recipe_fits_24gb(table):
    row, = [r for r in table if r["recipe"] == "lumina2_lora"]
    assert row["model"] == "Lumina-Image 2.0" and row["gradient_checkpointing"]
    assert 5.0 < row["parts"]["weights"] < 5.5  # the 2.6 B transformer in bf16
    assert row["gb"] <= 24.0, row
    # Gemma-2-2B (5.2 GB) beside it is still under 24 GB: the grids fit
    assert _estimate("lumina2_lora", "lumina2", "sample.every=250")["gb"] <= 24.0


@_shipped("sana_lora")
def test_the_sana_recipe_fits_24gb(table):
    row, = [r for r in table if r["recipe"] == "sana_lora"]
    assert row["model"] == "Sana 1.6B" and row["gb"] <= 24.0, row
    # 32 px a token: a quarter of a 16 px-a-token model's image tokens at the same side
    assert _estimate("sana_lora", "sana-1600m", "data.resolution=2048")["parts"]["activations"] == pytest.approx(
        4 * _estimate("sana_lora", "sana-1600m", "data.resolution=1024")["parts"]["activations"], rel=0.01)


@_shipped("hidream_lora")
def test_the_hidream_recipe(table):
    row, = [r for r in table if r["recipe"] == "hidream_lora"]
    assert row["model"] == "HiDream-I1 Full" and row["gradient_checkpointing"]
    # the 17.1 B transformer: 17.1 GB in 8 bits, 34 GB in bf16
    assert row["parts"]["weights"] > (17.0 if row["quantize"] != "none" else 34.0)
    # its four encoders (16 GB of them in bf16, Llama-3.1-8B and T5-XXL most) cache the prompts first
    assert row["phases"]["caching"] > 14.0


@_shipped("krea2_lora")
def test_the_krea2_recipe_fits_24gb(table):
    row, = [r for r in table if r["recipe"] == "krea2_lora"]
    assert row["model"] == "Krea 2" and row["quantize"] != "none" and row["gradient_checkpointing"]
    assert row["gb"] <= 24.0, row
    assert 12.5 < row["parts"]["weights"] < 13.5  # the 12.8 B transformer in 8 bits
    # in bf16 the transformer alone is 25.6 GB
    assert _estimate("krea2_lora", "krea2", "model.quantize=none")["gb"] > 24.0


@_shipped("qwen_image_2_1_lora")
def test_the_qwen_image_2_1_recipe_fits_24gb(table):
    row, = [r for r in table if r["recipe"] == "qwen_image_2_1_lora"]
    assert row["model"] == "Qwen-Image 2.1" and row["quantize"] != "none" and row["gradient_checkpointing"]
    assert row["gb"] <= 24.0, row
    assert 7.0 < row["parts"]["weights"] < 7.3  # the 7.1 B transformer in 8 bits
    # Qwen3-VL-8B's 17.5 GB in bf16 caching the captions is the peak; grids bring it back beside the transformer
    assert row["phase"] == "caching" and row["phases"]["caching"] > 17.5
    assert _estimate("qwen_image_2_1_lora", "qwen-image-2.1", "sample.every=250")["gb"] > 24.0
    # 4096 image tokens at 1024 px (unpacked 16x latents), not the 1024 a 2x2-packed model would have
    assert _estimate("qwen_image_2_1_lora", "qwen-image-2.1", "data.resolution=2048")["parts"]["activations"] > 3.5 * (
        row["parts"]["activations"])


def test_block_offload_fits_flux_in_12gb_and_qwen_image_at_1328px_in_24gb(table):
    """issue 36: train.offload keeps the streamed blocks' frozen weights off the GPU, less the two in flight."""
    flux, = [r for r in table if r["recipe"] == "flux_lora_12gb"]
    assert flux["gb"] <= 12.0 and flux["phases"]["training"] < flux["gb"]  # caching is the peak
    qwen, = [r for r in table if r["recipe"] == "qwen_image_lora_24gb"]
    assert qwen["gb"] <= 24.0 and qwen["resolution"] == 1328
    whole = _estimate("flux_lora_12gb", "flux-dev", "train.offload=null")["parts"]["weights"]
    half = _estimate("flux_lora_12gb")["parts"]["weights"]
    quarter = _estimate("flux_lora_12gb", "flux-dev", "train.offload.blocks=0.25")["parts"]["weights"]
    assert whole > quarter > half  # more blocks streamed, less on the GPU
    # Flux's 57 blocks in int8: 19 double ones of 0.34 GB, 38 single ones of 0.14 GB; 28 streamed, less two in flight
    assert whole - half == pytest.approx(5.1, abs=0.1)


@pytest.mark.parametrize("kind", ["adamw", "prodigy", "lion", "schedule_free_adamw"])
def test_the_optimizer_state_estimate_is_what_the_optimizer_keeps(kind):
    import importlib.util

    import torch

    from finetune.training import optimizers

    if importlib.util.find_spec(optimizers.REGISTRY[kind].module.split(".")[0]) is None:
        pytest.skip(f"{kind}'s package is not here")
    weight = torch.nn.Parameter(torch.full((16, 3072), 0.5))  # Prodigy keeps no copy of an all-zero start
    optimizer = optimizers.build([{"params": [weight], "lr": 1.0}], kind, {}, lr=1.0, betas=(0.9, 0.999),
                                 weight_decay=0.0, eps=1e-8)
    weight.grad = torch.ones_like(weight)
    optimizer.step()
    kept = sum(t.numel() * t.element_size() for t in optimizer.state[weight].values()
               if isinstance(t, torch.Tensor) and t.numel() > 1)
    assert memory._optimizer_bytes([(16, 3072)], kind) == kept


@_shipped("flux_kontext_lora", "flux2_edit_lora")
@pytest.mark.skipif(not declares_data_control(), reason="data.control (issue 38's paired data) is not declared yet")
def test_the_edit_recipes_fit_24gb_and_count_the_control_images_tokens(table):
    """The control image's tokens join the target's: the activations of an edit recipe are those of the same
    recipe without data.control with twice the image tokens, and both recipes stay under 24 GB."""
    for recipe, model, key in (("flux_kontext_lora", "Flux.1 Kontext", "flux-kontext-dev"),
                               ("flux2_edit_lora", "Flux.2 klein 9B", "flux2-klein-9b")):
        row, = [r for r in table if r["recipe"] == recipe]
        assert row["model"] == model and row["quantize"] != "none" and row["gradient_checkpointing"]
        assert row["gb"] <= 24.0, row
        loaded = memory.load(RECIPES / f"{recipe}.yaml")
        assert memory.control_tokens(loaded, memory.MODELS[key]) == 4096  # one 1024 px control image
        plain = _estimate(recipe, key, "data.control=null")["parts"]["activations"]
        assert 1.5 * plain < row["parts"]["activations"] < 2.5 * plain
    # what the headers say: sample grids bring the text encoders back past 24 GB
    assert _estimate("flux_kontext_lora", "flux-kontext-dev", "sample.every=250")["gb"] > 24.0
    assert _estimate("flux2_edit_lora", "flux2-klein-9b", "sample.every=250")["gb"] > 24.0
