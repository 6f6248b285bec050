"""What every edit family (a spec with control_images > 0) promises, checked the same way for each: for a prompt,
noisy target latents, a sigma and its control images, training (`family.predict` given
`conditions["control_latents"]` made by `encode_image_moments` + `control_latents`) feeds the transformer what the
family's stock pipeline feeds it when sampling with those images (`family.sample_kwargs`): the same tokens (target
then control), position ids, timestep and text conditioning. A family's file and its registry line cover it (and a
line in PIPELINE_LATENTS: how its pipeline takes given latents)."""
from __future__ import annotations

import pytest
import torch

from finetune.data.dataset import uncropped_conditions
from finetune.models import specs
from finetune.models.pipeline_folder import latent_channels_of
from finetune.training.sampling import size_arguments
from tests.helpers import control_latents_of, loaded_family, noise_image, recording

EDIT_FAMILIES = [name for name, spec in specs().items() if spec.control_images]


def _flux2_klein(seed: int):
    from finetune.models.flux2 import build_tiny

    return build_tiny(seed, klein=True)


# each edit family's tiny build, and builds of its other variants (a spec's `tiny` builds one)
BUILDS = {**{name: specs()[name].tiny for name in EDIT_FAMILIES}, "flux2-klein": _flux2_klein}


def _packed(noisy):
    from finetune.models.flux import pack

    return pack(noisy)


def _patchified(noisy):
    from diffusers import Flux2Pipeline

    return Flux2Pipeline._patchify_latents(noisy)


# family -> its pipeline's `latents` argument made of latents [B, C, h, w] in the family's layout
PIPELINE_LATENTS = {"flux_kontext": _packed, "flux2": _patchified}
# control images (width, height) per test case: of other sizes than the 32 px target, neither square, at least
# 64 px a side (Flux2ImageProcessor refuses smaller references)
CONTROL_SIZES = [(96, 64), (64, 80)]


def test_every_edit_family_is_under_contract():
    assert EDIT_FAMILIES, "no registered family takes control images"
    missing = sorted(set(EDIT_FAMILIES) - set(PIPELINE_LATENTS))
    assert not missing, f"add how these families' pipelines take latents to PIPELINE_LATENTS: {missing}"


@pytest.fixture(scope="module", params=sorted(BUILDS))
def edit_base(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param) / "base"
    BUILDS[request.param](0).save_pretrained(folder, safe_serialization=True)
    return loaded_family(folder)


def _cases():
    most = max(specs()[name].control_images for name in EDIT_FAMILIES)
    return list(range(min(most, len(CONTROL_SIZES)) + 1))


@pytest.mark.parametrize("count", _cases())
def test_training_feeds_the_transformer_what_the_pipeline_feeds_it_with_control_images(edit_base, count):
    """`count` control images (0: the text-to-image call), of their own sizes: every input the pipeline's one
    denoising call gives the transformer, training gives it too, equal."""
    family, parts, pipe = edit_base
    if count > family.control_images:
        pytest.skip(f"{family.name} takes {family.control_images} control image(s)")
    images = [noise_image(w, h, seed=i + 1) for i, (w, h) in enumerate(CONTROL_SIZES[:count])]
    noisy = torch.randn(1, latent_channels_of(parts.vae.config), 8, 8, generator=torch.Generator().manual_seed(0))
    prompt = "make the triangle blue"
    pipeline_calls, training_calls = [], []
    hook = recording(parts.transformer, pipeline_calls)
    with torch.no_grad():
        # guidance 1: the embedded value training gives by default, and no real CFG (one call) where it is CFG
        pipe(prompt=prompt, latents=PIPELINE_LATENTS[family.name](noisy), sigmas=[0.6], num_inference_steps=1,
             height=32, width=32, guidance_scale=1.0, output_type="latent",
             **{**size_arguments(pipe, 32, 32), **family.sample_kwargs(images, 32, 32, pipeline=pipe)})
    hook.remove()
    sigma = pipe.scheduler.sigmas[:1]  # 0.6, shifted as the pipeline shifts it
    hook = recording(parts.transformer, training_calls)
    with torch.no_grad():
        conditions = {**uncropped_conditions(1, 32, 32), "control_latents": control_latents_of(family, parts, images)}
        predicted = family.predict(parts, noisy, sigma, family.encode_prompts(parts, [prompt]), conditions)
    hook.remove()
    (inference,), (training,) = pipeline_calls, training_calls
    compared = {k for k, v in inference.items() if torch.is_tensor(v)}
    assert {"hidden_states", "img_ids", "timestep", "encoder_hidden_states", "txt_ids"} <= compared
    for key in sorted(compared):
        assert torch.is_tensor(training.get(key)), key
        torch.testing.assert_close(training[key], inference[key], rtol=0, atol=1e-5, msg=key)
    for key in set(inference) - compared:  # guidance None (klein), joint_attention_kwargs...
        assert training.get(key) is None or training[key] == inference[key], key
    # the control tokens are there, each grid with its own ids: its height and width, not swapped
    controls = sum((h // 8) * (w // 8) for w, h in CONTROL_SIZES[:count])  # 2x2 tokens of a 4x-down VAE's latents
    assert training["hidden_states"].shape[1] == 16 + controls
    ids = training["img_ids"].reshape(-1, training["img_ids"].shape[-1])
    for index, (w, h) in enumerate(CONTROL_SIZES[:count]):
        start = 16 + sum((hh // 8) * (ww // 8) for ww, hh in CONTROL_SIZES[:index])
        grid = ids[start:start + (h // 8) * (w // 8)]
        assert int(grid[:, 1].max()) == h // 8 - 1 and int(grid[:, 2].max()) == w // 8 - 1
        assert len(set(grid[:, 0].tolist())) == 1 and int(grid[0, 0]) != int(ids[0, 0])
    assert predicted.shape == noisy.shape


def test_each_sample_of_a_batch_is_edited_from_its_own_control_image(edit_base):
    """A batch of two, each with its own control image (one slot, stacked): each sample's prediction is the one
    it gets alone with its control image, and differs from the one it gets with the other's."""
    family, parts, _ = edit_base
    channels = latent_channels_of(parts.vae.config)
    noisy = torch.randn(2, channels, 8, 8, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        text = family.encode_prompts(parts, ["make it red", "make it blue"])
        controls = [control_latents_of(family, parts, [noise_image(96, 64, seed)])[0] for seed in (1, 2)]

        def predict(rows, slot):
            chosen = tuple(t[rows] for t in text) if isinstance(text, tuple) else text[rows]
            conditions = {**uncropped_conditions(len(sigma[rows]), 32, 32), "control_latents": [slot]}
            return family.predict(parts, noisy[rows], sigma[rows], chosen, conditions)

        together = predict(slice(0, 2), torch.cat(controls))
        alone = [predict(slice(i, i + 1), controls[i]) for i in range(2)]
        swapped = predict(slice(0, 1), controls[1])
    for i in range(2):
        torch.testing.assert_close(together[i:i + 1], alone[i], rtol=0, atol=1e-5)
    assert (swapped - alone[0]).abs().max() > 1e-4


def test_more_control_images_than_the_family_takes_are_refused(edit_base):
    family, parts, _ = edit_base
    too_many = [noise_image(64, 64, seed) for seed in range(family.control_images + 1)]
    noisy = torch.randn(1, latent_channels_of(parts.vae.config), 8, 8)
    with pytest.raises(ValueError, match=rf"takes .*{family.control_images}"):
        family.sample_kwargs(too_many, 32, 32)
    with torch.no_grad(), pytest.raises(ValueError, match=rf"{family.control_images}"):
        family.predict(parts, noisy, torch.tensor([0.5]), family.encode_prompts(parts, ["x"]),
                       {**uncropped_conditions(1, 32, 32),
                        "control_latents": control_latents_of(family, parts, too_many)})
