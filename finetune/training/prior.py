"""Prior preservation's part of the loop: class images from the frozen base, and the class half of each batch."""
from __future__ import annotations

import logging
from typing import Any

from finetune.data import BatchOrder, ImageCaptionDataset, make_loader
from finetune.data.class_images import (ClassImageSpec, base_identity, class_examples, class_folder,
                                        ensure_class_images)
from finetune.models.base import Components, ModelFamily
from finetune.recipe.schema import ModelOptions, PriorOptions
from finetune.training.inputs import BatchEncoder

log = logging.getLogger(__name__)


def class_image_stream(accelerator, family: ModelFamily, parts: Components, prior: PriorOptions,
                       model: ModelOptions, resolution: int, batch_size: int, seed: int, start: int,
                       num_workers: int, encoder: BatchEncoder) -> Any:
    """Draw (once, on the main process) and stream the class images; call before the strategy changes the base."""
    spec = ClassImageSpec(
        base_model=base_identity(model.base, model.revision, model.variant), prompts=tuple(prior.class_prompt),
        resolution=resolution, seed=prior.seed, steps=prior.steps, guidance_scale=prior.guidance_scale,
        negative_prompt=prior.negative_prompt)
    folder = class_folder(spec, prior.class_data_dir)
    if accelerator.is_main_process:
        drawn = ensure_class_images(spec, prior.num_class_images, folder, lambda: family.pipeline(parts),
                                    prior.generation_batch_size, show_progress=accelerator.is_local_main_process)
        log.info(f"class images: {prior.num_class_images} in {folder} ({drawn} drawn now)")
    accelerator.wait_for_everyone()
    examples = class_examples(spec, prior.num_class_images, folder)
    # its own seed, so the instance stream is the same with or without prior preservation
    order = BatchOrder(len(examples), 1, batch_size, accelerator.num_processes, accelerator.process_index,
                       seed + 7_919, start=start)
    sizes = [(resolution, resolution)] * len(examples)
    latent_keys = encoder.cache_latents(examples, sizes, False, "class images")
    dataset = ImageCaptionDataset(examples, sizes, "center", random_flip=False, caption_dropout=0.0,
                                  latent_keys=latent_keys)
    return iter(make_loader(dataset, order, num_workers))
