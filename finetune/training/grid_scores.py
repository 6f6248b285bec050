"""Scores of each sample grid (recipe keys validation.clip_model and validation.dino_model), computed when a grid is
drawn and written to history.jsonl on the grid's step, the trackers (validation/clip_score,
validation/dino_similarity) and report.html.

- CLIP score (`clip_score`): how well each grid image matches its own row's prompt. The convention of torchmetrics'
  CLIPScore (after Hessel et al. 2021, "CLIPScore"): 100 x max(cosine of CLIP's projected image and text
  embeddings, 0), averaged over the grid's images. Prompts longer than the text model's window are cut there.
- DINO similarity (`dino_similarity`): how much the grid's images look like the training images. The DreamBooth
  paper's DINO metric (Ruiz et al. 2023): the mean cosine of the CLS embeddings over every (grid image, training
  image) pair. The mean, not each grid image's best match: the max rewards a grid that copies one training image,
  the mean rewards the subject shared by all of them, and it is the figure papers report. Since a mean of cosines
  of unit vectors is the dot product with the mean unit vector, the training images leave one vector behind at
  setup (embedded once, up to MAX_REFERENCE_IMAGES of them, evenly spaced).
Both models load once at setup, run in no_grad and eval mode on the accelerator while a grid is scored, and wait on
the CPU between grids (a few hundred MB moved per grid, against the grid's own seconds of drawing).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from PIL import Image

MAX_REFERENCE_IMAGES = 256  # training images the DINO reference is made of (more add time at setup, little else)
BATCH = 32  # images per forward


@dataclass
class GridScorer:
    """The loaded scoring models; `score` scores one grid's images. A model is None when its key is unset."""
    device: torch.device
    clip: tuple[Any, Any] | None = None  # (CLIPModel, CLIPProcessor)
    dino: tuple[Any, Any] | None = None  # (AutoModel, AutoImageProcessor)
    reference: torch.Tensor | None = None  # [d] fp32 on the CPU: mean of the training images' unit CLS embeddings
    names: tuple[str | None, str | None] = (None, None)  # the keys' values, for the summary
    references: int = 0  # training images in `reference`

    @property
    def summary(self) -> str:
        said = []
        if self.clip is not None:
            said.append(f"CLIP score against their prompts ({self.names[0]})")
        if self.dino is not None:
            said.append(f"DINO similarity to {self.references} training image(s) ({self.names[1]})")
        return "sample grids scored: " + "; ".join(said)

    @torch.no_grad()
    def score(self, rows: Sequence[Sequence[Image.Image]], prompts: Sequence[str]) -> dict[str, float]:
        """`rows`: the grid's images, one row per prompt of `prompts`. Returns {"clip_score", "dino_similarity"},
        those whose model is set. Each model comes to the accelerator for the call and goes back to the CPU."""
        images = [image.convert("RGB") for row in rows for image in row]
        texts = [prompt for row, prompt in zip(rows, prompts) for _ in row]
        scores = {}
        if self.clip is not None:
            scores["clip_score"] = _on_device(self.clip[0], self.device, clip_score, self.clip, images, texts)
        if self.dino is not None:
            embedded = _on_device(self.dino[0], self.device, dino_embeddings, self.dino, images)
            scores["dino_similarity"] = float((embedded @ self.reference).mean())
        return scores


def clip_score(clip: tuple[Any, Any], images: list[Image.Image], texts: list[str]) -> float:
    """Mean over the pairs of 100 x max(cos(image i, text i), 0) (torchmetrics' CLIPScore convention)."""
    model, processor = clip
    device = next(model.parameters()).device
    window = model.config.text_config.max_position_embeddings
    cosines = []
    for start in range(0, len(images), BATCH):
        inputs = processor(text=texts[start:start + BATCH], images=images[start:start + BATCH], return_tensors="pt",
                           padding=True, truncation=True, max_length=window)
        out = model(**{key: value.to(device) for key, value in inputs.items()})
        image, text = (torch.nn.functional.normalize(e.float(), dim=-1) for e in (out.image_embeds, out.text_embeds))
        cosines.append((image * text).sum(-1).cpu())
    return float(100 * torch.cat(cosines).clamp(min=0).mean())


def dino_embeddings(dino: tuple[Any, Any], images: list[Image.Image]) -> torch.Tensor:
    """[n, d] fp32 CPU unit vectors: each image's CLS token from the model's last hidden state."""
    model, processor = dino
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(images), BATCH):
        pixels = processor(images=images[start:start + BATCH], return_tensors="pt")["pixel_values"]
        cls = model(pixel_values=pixels.to(device, next(model.parameters()).dtype)).last_hidden_state[:, 0]
        out.append(torch.nn.functional.normalize(cls.float(), dim=-1).cpu())
    return torch.cat(out)


def _on_device(model: torch.nn.Module, device: torch.device, work, *args):
    model.to(device)
    try:
        return work(*args)
    finally:
        model.to("cpu")


def load_grid_scorer(clip_model: str | None, dino_model: str | None, training_images: Sequence,
                     device: torch.device, source: str) -> GridScorer | None:
    """The models of validation.clip_model / dino_model (a local folder or a hub id), loaded on the CPU in eval
    mode, and the DINO reference from `training_images` (data.sources.Example, each `.load()` an RGB image). None
    when neither is set. Raises RecipeError (of the recipe `source`) naming the key when a model cannot load."""
    from finetune.recipe.load import RecipeError

    if clip_model is None and dino_model is None:
        return None
    try:
        return _load(clip_model, dino_model, training_images, device)
    except _NotLoaded as exc:
        raise RecipeError(source, [str(exc)]) from None


class _NotLoaded(Exception):
    pass


def _load(clip_model: str | None, dino_model: str | None, training_images: Sequence,
          device: torch.device) -> GridScorer:
    from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor

    scorer = GridScorer(device, names=(clip_model, dino_model))
    if clip_model is not None:
        scorer.clip = (_loaded("validation.clip_model", clip_model, CLIPModel), _loaded(
            "validation.clip_model", clip_model, CLIPProcessor))
    if dino_model is not None:
        scorer.dino = (_loaded("validation.dino_model", dino_model, AutoModel), _loaded(
            "validation.dino_model", dino_model, AutoImageProcessor))
        chosen = _evenly(list(training_images), MAX_REFERENCE_IMAGES)
        with torch.no_grad():
            embedded = _on_device(scorer.dino[0], device, dino_embeddings, scorer.dino, [e.load() for e in chosen])
        scorer.reference, scorer.references = embedded.mean(0), len(chosen)
    return scorer


def _loaded(key: str, name: str, kind):
    try:
        loaded = kind.from_pretrained(name)
    except (OSError, ValueError) as exc:  # not found, no config, not a model of that kind
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _NotLoaded(f"{key}: could not load {name} as a {kind.__name__} ({first}); give a local folder saved "
                         "with save_pretrained or a hub id such as "
                         + ("openai/clip-vit-base-patch32" if "clip" in key else "facebook/dinov2-small")) from None
    if isinstance(loaded, torch.nn.Module):
        loaded.eval().requires_grad_(False)
    return loaded


def _evenly(items: list, at_most: int) -> list:
    if len(items) <= at_most:
        return items
    return [items[i * len(items) // at_most] for i in range(at_most)]
