"""Latent and text caches: on by default where they are right, exactly the training an uncached run does,
refused or switched off (with the reason) where they would be wrong; idle encoders leave the accelerator."""
from __future__ import annotations

import logging

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from finetune.cli import main
from finetune.data.caches import LatentStore, TextCache, fill, pixel_key, plan_caches, vae_identity
from finetune.data.sources import Example
from finetune.models.stable_diffusion import StableDiffusion
from finetune.recipe.load import parse_recipe
from finetune.training.loop import train
from finetune.training.offload import offload, on_device, one_at_a_time
from tests.helpers import recipe_dict

AUGMENTED = {"random_flip": True, "caption_dropout": 0.3, "resolution": 32}
RUN = {"max_steps": 4, "batch_size": 2, "learning_rate": 1e-3}


def _count_calls(monkeypatch, name: str) -> list[int]:
    calls = []
    original = getattr(StableDiffusion, name)

    def counted(self, parts, values, *args):
        calls.append(len(values))
        return original(self, parts, values, *args)

    monkeypatch.setattr(StableDiffusion, name, counted)
    return calls


@pytest.mark.parametrize("prior", [{}, {"mode": "base_prediction", "class_prompt": ["a purple shape"]}])
def test_cached_run_trains_exactly_as_the_uncached_one(tiny_base, concept_dir, tmp_path, prior):
    def run(name, cache):
        recipe = parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / name, data=AUGMENTED, train=RUN,
                                          prior=prior, cache=cache))
        return load_file(train(recipe))

    plain = run("plain", {"latents": "off", "text": "off"})
    cached = run("cached", {})  # the defaults: both caches on
    on_disk = run("disk", {"latents": "disk", "dir": str(tmp_path / "latents")})
    assert plain.keys() == cached.keys() == on_disk.keys()
    for key in plain:
        # equal up to float noise: the cache encodes one image at a time, the uncached step a batch of two
        torch.testing.assert_close(cached[key], plain[key], rtol=1e-3, atol=2e-5)
        assert torch.equal(cached[key], on_disk[key]), key
    # and it trained: LoRA's B matrices start at zero
    assert any("lora_B" in k and plain[k].abs().sum() > 0 for k in plain)


def test_steps_read_the_caches_instead_of_encoding(tiny_base, concept_dir, tmp_path, monkeypatch):
    images = _count_calls(monkeypatch, "encode_image_moments")
    texts = _count_calls(monkeypatch, "encode_prompts")
    recipe = parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "out", data=AUGMENTED,
                                      train={**RUN, "max_steps": 6}))
    train(recipe)
    # 4 images x (as drawn, mirrored), one at a time, once; all captions (and the empty one) in one batch
    assert images == [1] * 8
    assert texts == [2]  # "a purple sks" and "" (caption dropout)

    images.clear(), texts.clear()
    recipe = parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "plain", data=AUGMENTED,
                                      train={**RUN, "max_steps": 6}, cache={"latents": "off", "text": "off"}))
    train(recipe)
    assert images == [2] * 6 and texts == [2] * 6  # without caches: every step encodes its batch


def test_disk_cache_is_reused_and_keyed_by_content(tiny_base, tmp_path):
    parts = StableDiffusion().load(str(tiny_base))
    vae_id = vae_identity(parts.vae)
    red = Image.new("RGB", (40, 32), (200, 0, 0))
    red.paste((0, 0, 200), (0, 0, 12, 32))  # a blue stripe on the left: mirrored, it is another image
    examples = [Example("red", "a red", lambda: red), Example("blue", "a blue", lambda: Image.new("RGB", (32, 32), "blue"))]
    encode = lambda pixels: StableDiffusion().encode_image_moments(parts, pixels)  # noqa: E731
    store = LatentStore(tmp_path / "cache")
    keys, encoded = fill(store, examples, [(32, 32)] * 2, True, vae_id, encode, "test", show_progress=False)
    # keyed by the pixels the VAE sees: the mirrored red image is another entry, the uniform blue one is not
    assert encoded == 3 and len(set(keys.values())) == 3 and keys[(1, False)] == keys[(1, True)]
    again, encoded = fill(LatentStore(tmp_path / "cache"), examples, [(32, 32)] * 2, True, vae_id, encode, "t",
                          show_progress=False)
    assert encoded == 0 and again == keys  # a later run finds everything on disk

    red.putpixel((20, 16), (0, 255, 0))  # the image changed: a new entry for it, not the old one
    changed, encoded = fill(store, examples, [(32, 32)] * 2, True, vae_id, encode, "t", show_progress=False)
    assert encoded == 2 and changed[(0, False)] != keys[(0, False)] and changed[(1, True)] == keys[(1, True)]
    _, encoded = fill(store, examples, [(40, 32)] * 2, False, vae_id, encode, "t", show_progress=False)
    assert encoded == 2  # another training size: new entries

    mean, std = store.get([keys[(1, False)]])
    expected = encode(torch.full((1, 3, 32, 32), -1.0).index_fill_(1, torch.tensor([2]), 1.0))
    torch.testing.assert_close(mean, expected[0])
    torch.testing.assert_close(std, expected[1])
    assert not list((tmp_path / "cache").rglob("*.tmp*"))  # entries are written whole, then renamed


def test_cache_key_depends_on_the_vae(tiny_base):
    parts = StableDiffusion().load(str(tiny_base))
    pixels = torch.zeros(3, 32, 32)
    before = pixel_key(pixels, vae_identity(parts.vae))
    with torch.no_grad():
        next(parts.vae.parameters()).add_(1e-3)
    assert pixel_key(pixels, vae_identity(parts.vae)) != before
    assert pixel_key(pixels, vae_identity(parts.vae.to(torch.bfloat16))) != before


def test_auto_turns_the_latent_cache_off_for_random_crops(tiny_base, concept_dir, tmp_path, monkeypatch, capsys):
    images = _count_calls(monkeypatch, "encode_image_moments")
    recipe = parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "out", train=RUN,
                                      data={"crop": "random", "resolution": 24}))
    train(recipe)
    assert "latent cache off: data.crop is random" in capsys.readouterr().out
    assert images == [2] * 4  # encoded every step, each step's own crop


def test_auto_turns_the_text_cache_off_when_the_text_encoder_trains():
    plan = plan_caches("auto", "auto", "center", "strategy.text_encoder is true, so the text encoder trains", 0)
    assert plan.latents == "memory" and plan.text is False
    assert plan.notes == ["text cache off: strategy.text_encoder is true, so the text encoder trains"]
    assert plan_caches("auto", "auto", "center", None, 10 * 1024**3).latents == "disk"  # too big for memory
    assert plan_caches("off", "off", "center", None, 0) == plan_caches("off", "off", "random", None, 0)


@pytest.mark.parametrize("sections, expected", [
    ({"data": {"crop": "random"}, "cache": {"latents": "memory"}}, "cache.latents: memory cannot be right"),
    ({"data": {"crop": "random"}, "cache": {"latents": "disk"}}, "data.crop is random"),
    ({"strategy": {"kind": "lora", "text_encoder": True}, "cache": {"text": "on"}},
     "cache.text: on cannot be right: strategy.text_encoder is true"),
    ({"strategy": {"kind": "textual_inversion", "placeholder_token": "<x>", "initializer_token": "x"},
      "cache.text": None, "cache": {"text": "on"}}, "textual inversion trains"),
    ({"cache": {"text": "off", "text_encoders": "one_at_a_time"}},
     "cache.text_encoders: one_at_a_time brings each text encoder to the accelerator only while the text cache "
     "fills, but the text is not cached (cache.text: off)"),
])
def test_validate_refuses_caches_that_would_be_wrong(tiny_base, concept_dir, tmp_path, sections, expected, capsys):
    import yaml

    sections.pop("cache.text", None)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(tiny_base, concept_dir, tmp_path / "out", **sections)))
    assert main(["validate", str(path)]) == 2
    assert expected in capsys.readouterr().err


def test_text_cache_encodes_each_caption_once_and_late_ones_live():
    calls = []

    def encode(captions):
        calls.append(list(captions))
        return torch.stack([torch.full((3, 2), float(len(c))) for c in captions])

    cache = TextCache(encode, batch_size=2)
    assert cache.fill(["ab", "abc", "ab", ""]) == 3
    assert calls == [["ab", "abc"], [""]]
    out = cache.get(["", "ab", "abcd"], torch.device("cpu"))  # "abcd" was not foreseen
    assert calls[-1] == ["abcd"]
    assert out.shape == (3, 3, 2) and out[:, 0, 0].tolist() == [0.0, 2.0, 4.0]


def test_offload_keeps_what_the_module_computes(tiny_base):
    parts = StableDiffusion().load(str(tiny_base))
    ids = torch.tensor([[49, 50, 51]])
    before = parts.text_encoder(ids)[0]
    pointers = {p.data_ptr() for p in parts.text_encoder.parameters()}
    offload(parts.text_encoder, torch.device("cpu"))
    # its weights now live in a memory-mapped file, not in the memory they were loaded into
    assert not pointers & {p.data_ptr() for p in parts.text_encoder.parameters()}
    with on_device([parts.text_encoder], torch.device("cpu")):
        assert torch.equal(parts.text_encoder(ids)[0], before)


def test_one_at_a_time_holds_one_encoder_on_the_device_and_moves_its_inputs():
    moves, seen = [], []
    first, second = torch.nn.Identity(), torch.nn.Identity()
    for name, module in (("first", first), ("second", second)):
        module.to = lambda device, name=name, module=module: moves.append((name, str(device))) or module  # recorded
        module.register_forward_hook(lambda module, args, out: seen.append(args[0].device.type))
    device = torch.device("meta")  # stands for the accelerator: its tensors carry no data, only their device
    with one_at_a_time([first, second], device):
        first(torch.ones(1, 2))
        first(torch.ones(1, 2))  # already there: no transfer
        second(first(torch.ones(1, 2)))
    assert moves == [("first", "meta"), ("first", "cpu"), ("second", "meta"), ("second", "cpu")]
    assert seen == ["meta"] * 4  # each module's input came to the device with it
    moves.clear()
    first(torch.ones(1, 2))  # the hooks are gone with the context
    assert moves == [] and seen[-1] == "cpu"


def test_one_at_a_time_trains_as_together(tiny_base, concept_dir, tmp_path):
    def run(name, text_encoders):
        recipe = parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / name, train=RUN,
                                          cache={"text_encoders": text_encoders}))
        return load_file(train(recipe))

    together, one_by_one = run("together", "together"), run("one", "one_at_a_time")
    assert together.keys() == one_by_one.keys()
    assert all(torch.equal(together[key], one_by_one[key]) for key in together)


def test_a_run_with_caches_samples_with_the_offloaded_encoders(tiny_base, concept_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    recipe = parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "out", train=RUN,
                                      sample={"every": 2, "prompts": ["a purple sks"], "steps": 2}))
    train(recipe)
    assert sorted(p.name for p in (tmp_path / "out" / "samples").iterdir()) == ["step-000002.png",
                                                                                "step-000004.png"]
    assert "latent cache (memory): 4 variant(s) of 4 training images, 4 encoded now" in caplog.text


def test_bare_on_and_off_in_yaml_mean_the_words(tiny_base, concept_dir, tmp_path):
    from finetune.recipe.load import load_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(f"model: {{base: {tiny_base}}}\nstrategy: {{kind: lora}}\ndata: {{images: {concept_dir}}}\n"
                    f"output_dir: {tmp_path / 'out'}\ncache:\n  latents: off\n  text: on\n")
    recipe = load_recipe(str(path), [])
    assert (recipe.cache.latents, recipe.cache.text) == ("off", "on")
    assert load_recipe(str(path), ["cache.latents=off", "cache.text=off"]).cache.text == "off"


def test_a_run_that_trains_the_text_encoder_encodes_captions_every_step(tiny_base, concept_dir, tmp_path,
                                                                        monkeypatch, capsys):
    texts = _count_calls(monkeypatch, "encode_prompts")
    recipe = parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "out", train=RUN,
                                      strategy={"kind": "lora", "rank": 4, "text_encoder": True}))
    train(recipe)
    assert "text cache off: strategy.text_encoder is true" in capsys.readouterr().out
    assert texts == [2] * 4  # through the training text encoder at every step, never from a cache
