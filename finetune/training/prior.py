"""Prior preservation's part of the loop: class images from the frozen base, and the class half of each batch."""
from __future__ import annotations

import logging
from typing import Any, Callable

from finetune.data import BatchOrder, ImageCaptionDataset, make_loader
from finetune.data.class_images import (ClassImageSpec, base_identity, class_examples, class_folder,
                                        ensure_class_images)
from finetune.recipe.schema import ModelOptions, PriorOptions
from finetune.training.inputs import BatchEncoder

log = logging.getLogger(__name__)


def class_image_spec(prior: PriorOptions, model: ModelOptions, resolution: int) -> ClassImageSpec:
    """What the class images are drawn with: the base as the cache sees it, the prompts and the drawing settings."""
    return ClassImageSpec(
        base_model=base_identity(model.base, model.revision, model.variant), prompts=tuple(prior.class_prompt),
        resolution=resolution, seed=prior.seed, steps=prior.steps, guidance_scale=prior.guidance_scale,
        negative_prompt=prior.negative_prompt)


def class_image_stream(accelerator, spec: ClassImageSpec, prior: PriorOptions, pipeline: Callable[[], Any],
                       instance_order: BatchOrder, num_workers: int, encoder: BatchEncoder) -> Any:
    """Draw (once, on the main process, with `pipeline()`) and stream the class images, batched as
    `instance_order` batches the training images and from the same micro-step on; call before the strategy
    changes the base."""
    folder = class_folder(spec, prior.class_data_dir)
    if accelerator.is_main_process:
        drawn = ensure_class_images(spec, prior.num_class_images, folder, pipeline,
                                    prior.generation_batch_size, show_progress=accelerator.is_local_main_process)
        log.info(f"class images: {prior.num_class_images} in {folder} ({drawn} drawn now)")
    accelerator.wait_for_everyone()
    examples = class_examples(spec, prior.num_class_images, folder)
    # its own seed, so the instance stream is the same with or without prior preservation
    order = BatchOrder(len(examples), 1, instance_order.batch_size, instance_order.world_size,
                       instance_order.rank, instance_order.seed + 7_919, start=instance_order.start)
    sizes = [(spec.resolution, spec.resolution)] * len(examples)
    latent_keys = encoder.cache_latents(examples, sizes, False, "class images")
    dataset = ImageCaptionDataset(examples, sizes, "center", random_flip=False, caption_dropout=0.0,
                                  latent_keys=latent_keys)
    return iter(make_loader(dataset, order, num_workers, pin_memory=accelerator.device.type == "cuda"))
