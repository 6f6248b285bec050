"""Sample grids scored by CLIP and DINO (validation.clip_model / dino_model, finetune/training/grid_scores.py) in
real runs on the tiny base, with tiny random CLIP and DINOv2 models built offline: the figures are those of the
grid's own images against their own prompts and the training images, on the grid's history line, the trackers
and the report; the keys are checked before any model loads."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from finetune.recipe.load import RecipeError, parse_recipe
from finetune.report.history import read_history
from finetune.training.loop import run_steps, train
from finetune.training.run import setup
from tests.helpers import history_of, recipe_dict, reset_accelerate

PROMPTS = ["a purple sks", "a red circle on white"]
IMAGES_PER_PROMPT = 2


@pytest.fixture(scope="module")
def scoring_models(tmp_path_factory) -> tuple[Path, Path]:
    """Tiny random CLIP (with its processor: a character-level tokenizer) and DINOv2 folders. CLIP's pooled
    outputs are pushed along one shared direction (layer-norm bias) through one shared projection, so cosines are
    positive (the score clamps negatives to 0: a random model's would all be 0) and still differ pair by pair."""
    from transformers import (BitImageProcessor, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor,
                              Dinov2Config, Dinov2Model)

    from finetune.models.tiny_clip import build_tokenizer

    folder = tmp_path_factory.mktemp("scoring")
    torch.manual_seed(0)
    tokenizer = build_tokenizer(32)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=32, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    shared = torch.randn(32)
    with torch.no_grad():
        for norm in (clip.text_model.final_layer_norm, clip.vision_model.post_layernorm):
            norm.weight.fill_(0.5)
            norm.bias.copy_(shared)
        clip.text_projection.weight.copy_(clip.visual_projection.weight)
    clip.save_pretrained(folder / "clip")
    square = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}
    CLIPProcessor(CLIPImageProcessor(**square), tokenizer).save_pretrained(folder / "clip")
    Dinov2Model(Dinov2Config(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             mlp_ratio=2)).save_pretrained(folder / "dino")
    BitImageProcessor(**square).save_pretrained(folder / "dino")
    return folder / "clip", folder / "dino"


def _recipe(tiny_base, concept_dir, out, clip, dino, **sections):
    sample = {"every": 2, "prompts": PROMPTS, "images_per_prompt": IMAGES_PER_PROMPT, "steps": 2}
    return parse_recipe(recipe_dict(tiny_base, concept_dir, out, sample=sample,
                                    validation={"clip_model": clip and str(clip), "dino_model": dino and str(dino)}, **sections))


def _cells(grid_png: Path) -> list[list[Image.Image]]:
    """The grid's 32-pixel images, a list per row (one size: rows_grid lays them edge to edge)."""
    grid = Image.open(grid_png).convert("RGB")
    return [[grid.crop((32 * c, 32 * r, 32 * c + 32, 32 * r + 32)) for c in range(grid.width // 32)]
            for r in range(grid.height // 32)]


def _direct_clip(clip: Path, pairs: list[tuple[Image.Image, str]]) -> float:
    """CLIP score computed directly, one pair at a time: 100 x max(cos, 0), averaged."""
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(clip).eval(), CLIPProcessor.from_pretrained(clip)
    values = []
    with torch.no_grad():
        for image, prompt in pairs:
            inputs = processor(text=[prompt], images=[image], return_tensors="pt", padding=True)
            out = model(**inputs)
            values.append(max(torch.cosine_similarity(out.image_embeds, out.text_embeds).item(), 0.0))
    return 100 * sum(values) / len(values)


def _direct_dino(dino: Path, generated: list[Image.Image], training: list[Image.Image]) -> float:
    """The mean CLS cosine over every (generated, training) pair, one image at a time."""
    from transformers import AutoImageProcessor, AutoModel

    model, processor = AutoModel.from_pretrained(dino).eval(), AutoImageProcessor.from_pretrained(dino)
    with torch.no_grad():
        def embed(image):
            return model(**processor(images=[image], return_tensors="pt")).last_hidden_state[0, 0]
        return sum(torch.cosine_similarity(embed(g), embed(t), dim=0).item()
                   for g in generated for t in training) / (len(generated) * len(training))


def test_each_grid_is_scored_against_its_own_prompts_and_the_training_images(tiny_base, concept_dir, scoring_models,
                                                                              tmp_path):
    clip, dino = scoring_models
    with setup(_recipe(tiny_base, concept_dir, tmp_path / "out", clip, dino)) as run:
        assert any(f"sample grids scored: CLIP score against their prompts ({clip}); DINO similarity to 4 training "
                   f"image(s) ({dino})" in line for line in run.summary)
        logged = []
        log = run.accelerator.log
        run.accelerator.log = lambda values, step: logged.append((step, dict(values))) or log(values, step=step)
        run_steps(run)
    history = read_history(tmp_path / "out")
    assert [r["step"] for r in history] == [1, 2, 3, 4]  # one line per step: the scores amend the grid's line
    scored = {r["step"]: (r.get("clip_score"), r.get("dino_similarity")) for r in history}
    assert scored[1] == scored[3] == (None, None) and None not in scored[2] + scored[4]
    cells = _cells(tmp_path / "out" / "samples" / "step-000004.png")
    pairs = [(image, prompt) for row, prompt in zip(cells, PROMPTS) for image in row]
    assert len(pairs) == len(PROMPTS) * IMAGES_PER_PROMPT
    expected_clip = _direct_clip(clip, pairs)
    assert 0 < expected_clip and scored[4][0] == pytest.approx(expected_clip, rel=1e-4)
    # each image against ITS prompt: the rows' prompts swapped give another figure
    swapped = _direct_clip(clip, [(image, prompt) for row, prompt in zip(cells, PROMPTS[::-1]) for image in row])
    assert abs(swapped - expected_clip) > 1e-3 * expected_clip
    training = [Image.open(p).convert("RGB") for p in sorted(concept_dir.glob("*.png"))]
    assert scored[4][1] == pytest.approx(_direct_dino(dino, [image for image, _ in pairs], training), rel=1e-4)
    assert [(step, values) for step, values in logged if "validation/clip_score" in values] == [
        (2, {"validation/clip_score": scored[2][0], "validation/dino_similarity": scored[2][1]}),
        (4, {"validation/clip_score": scored[4][0], "validation/dino_similarity": scored[4][1]})]
    page = (tmp_path / "out" / "report.html").read_text()
    assert f"CLIP score (x100 cosine, vs. its prompt) {scored[4][0]:.4g}" in page
    assert f"DINO similarity to the training images {scored[4][1]:.4g}" in page


def test_scoring_leaves_training_and_its_grids_unchanged(tiny_base, concept_dir, scoring_models, tmp_path):
    clip, dino = scoring_models
    plain = _recipe(tiny_base, concept_dir, tmp_path / "plain", None, None)
    train(plain)
    reset_accelerate()
    train(_recipe(tiny_base, concept_dir, tmp_path / "scored", clip, dino))
    assert history_of(tmp_path / "plain") == history_of(tmp_path / "scored")
    for name in ("step-000002.png", "step-000004.png"):
        assert (tmp_path / "plain" / "samples" / name).read_bytes() == (
            tmp_path / "scored" / "samples" / name).read_bytes()


def test_validate_refuses_a_missing_folder_and_scores_without_grids(tiny_base, concept_dir, tmp_path):
    with pytest.raises(RecipeError) as refused:  # parse_recipe runs `finetune validate`'s checks
        parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "out",
                                 validation={"clip_model": str(tmp_path / "no-clip"),
                                             "dino_model": "facebook/dinov2-small"}))
    problems = refused.value.problems
    assert any(p.startswith(f"validation.clip_model: {tmp_path / 'no-clip'} is not an existing folder")
               for p in problems)
    assert not any("validation.dino_model: facebook" in p for p in problems)  # a hub id is looked up at setup
    assert any(p.startswith("validation.dino_model: scores the sample grids, and sample.every is 0") for p in problems)


def test_a_model_that_cannot_load_names_its_key_before_the_base_loads(tiny_base, concept_dir, scoring_models,
                                                                      tmp_path, monkeypatch):
    clip, _ = scoring_models
    recipe = _recipe(tiny_base, concept_dir, tmp_path / "out", clip, "nobody/no-such-dino")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RecipeError, match=r"validation\.dino_model: could not load nobody/no-such-dino"):
        with setup(recipe):
            pass
    assert not (tmp_path / "out" / "history.jsonl").exists()
