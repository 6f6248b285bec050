"""The recipe: typed sections whose field names are the YAML keys users write.

Every field is declared with `key(default, help, bounds)` or `required(help)` (finetune/recipe/keys.py): its help
text is the recipe reference (docs/recipes.md), its bounds are checked where every key is read.
Strategy options live with each strategy (see `finetune.strategies`), because only the strategy knows them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from finetune.recipe.keys import key, required  # noqa: F401  (required: strategies import it from here)



LrScheduler = Literal[
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
]


@dataclass
class ModelOptions:
    """What every family's `model` section holds; a family's options class (its file in finetune/models/) adds
    its own keys, as each strategy's class adds to StrategyOptions."""

    base: str = required()  # hub id, local diffusers folder, or single .safetensors/.ckpt checkpoint
    revision: Optional[str] = None
    variant: Optional[str] = None  # e.g. "fp16" for the fp16 weight files of a hub repository
    # dtype of the frozen base; "auto" follows train.mixed_precision
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    # which model family (finetune/models/): "auto" tells it from a diffusers folder's model_index.json or a
    # single file's keys; a hub id or .ckpt that cannot be read before loading is taken as sd unless set here.
    # The family chooses the rest of this section: its own options (its objective's included) follow these
    family: str = "auto"
    # the frozen denoiser's Linear weights in 8 bits (torchao; adapters stay full precision), for LoRA-type
    # strategies on large transformers (finetune/models/quantize.py): int8 / fp8 store 8 bits and multiply in the
    # compute dtype; int8_w8a8 / fp8_w8a8 also quantise each activation on the fly and multiply in 8 bits (faster
    # on GPUs with 8-bit tensor cores; fp8 needs compute capability 8.9+). "none": as loaded
    quantize: Literal["none", "int8", "fp8", "int8_w8a8", "fp8_w8a8"] = "none"
    # for a single-file checkpoint: a diffusers folder or hub id holding the matching configs
    config: Optional[str] = None
    # another VAE instead of the base's: a folder holding one, a pipeline folder (its vae/), a single file or a
    # hub id (e.g. stabilityai/sd-vae-ft-mse)
    vae: Optional[str] = None

    def problems(self) -> list[str]:
        """What is wrong with the family's own options (a family's class extends this)."""
        return []


@dataclass
class DataOptions:
    images: Optional[str] = None  # folder of images with .txt sidecars or a metadata.jsonl
    dataset: Optional[str] = None  # Hugging Face datasets name, or a save_to_disk folder
    split: str = "train"
    image_column: str = "image"
    caption_column: str = "text"
    prompt: Optional[str] = None  # one fixed caption for every image (e.g. "a photo of sks dog")
    caption_extension: str = ".txt"
    repeats: int = 1
    resolution: int = 512
    crop: Literal["center", "random"] = "center"
    random_flip: bool = False
    caption_dropout: float = 0.0  # probability of an empty caption, for classifier-free guidance
    # captions longer than the text encoder's 75 tokens: encoded whole in 75-token chunks, each with its own start
    # and end tokens (kohya's --max_token_length, AUTOMATIC1111's long prompts); None: cut at the window
    max_token_length: Optional[Literal[75, 150, 225]] = None
    on_bad_image: Literal["error", "skip"] = "error"
    # images smaller than the size they train at: enlarge (softer), leave out, or refuse (data/prepare.py)
    on_small_image: Literal["upscale", "skip", "error"] = "upscale"
    num_workers: int = 0
    # aspect-ratio bucketing (finetune/data/buckets.py): each image at the bucket size nearest its shape
    bucketing: bool = False
    buckets: list[list[int]] = field(default_factory=list)  # [[width, height], ...]; empty: derived as below
    # derived buckets: sides from bucket_min_side to bucket_max_side in bucket_step steps, area at most resolution
    # squared; None: following the resolution (64, 256, 1024 at 512 px; see finetune/data/buckets.py)
    bucket_step: Optional[int] = None
    bucket_min_side: Optional[int] = None
    bucket_max_side: Optional[int] = None
    bucket_max_crop: float = 0.5  # skip an image a crop would cut by more than this share of its area
    # masked loss (finetune/data/masks.py): "alpha" takes each image's alpha channel, a folder holds one mask
    # image per training image by file name (white: trained, black: not); the per-pixel loss is weighted by the
    # mask brought to latent size. None: every pixel counts
    masks: Optional[str] = None
    unmasked_weight: float = 0.0  # the loss weight where the mask is black (0: those pixels do not train)


@dataclass
class EmaOptions:
    """train.ema: an fp32 moving average of what trains, saved as the artifact (the raw weights beside it)."""

    decay: float = 0.999
    update_every: int = 1  # optimizer steps between updates
    device: Literal["accelerator", "cpu"] = "accelerator"  # cpu: the average in CPU memory (large DreamBooth runs)


@dataclass
class OffloadOptions:
    """train.offload: block offload for large transformers on small cards."""

    blocks: float = 0  # how many transformer blocks stream from the CPU: a count (>= 1) or a fraction (< 1)


@dataclass
class TrainOptions:
    max_steps: int = 1000  # optimizer steps, whatever the number of processes
    seed: int = 0
    batch_size: int = 1  # per process and micro-step
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    lr_scheduler: LrScheduler = "constant"
    lr_warmup_steps: int = 0
    optimizer: Literal["adamw", "adamw8bit", "prodigy", "adafactor", "lion", "schedule_free_adamw"] = "adamw"
    # the optimizer's own arguments by their library's names (e.g. {d_coef: 1.0} for prodigy); checked against
    # its signature before any model loads (finetune/training/optimizers.py)
    optimizer_args: dict[str, Any] = field(default_factory=dict)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0  # 0 turns clipping off
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, ~30% slower
    # torch.compile of the denoiser (finetune/training/compile.py), with the adapter layers inside: "blocks" each
    # repeated block (the U-Net's attention and ResNet blocks, a transformer's blocks) compiled once for all its
    # copies; "full" the whole denoiser; "max" the whole denoiser with CUDA graphs and autotuned kernels (a CUDA
    # GPU and one batch shape); "auto": blocks on CUDA, off elsewhere. An older recipe's true reads as full
    compile: Literal["auto", "off", "blocks", "full", "max"] = "auto"
    # scaled_dot_product_attention's kernels (finetune/training/attention.py); "auto": PyTorch's choice, less those
    # known to fail for this torch and GPU (cuDNN attention in Flux's backward pass with torch 2.11)
    attention: Literal["auto", "flash", "efficient", "cudnn", "math"] = "auto"
    channels_last: bool = False  # denoiser weights and inputs in NHWC, faster convolutions on many GPUs
    # an exponential moving average of the trained weights (finetune/training/ema.py); None: none
    ema: Optional[EmaOptions] = None
    # frozen transformer blocks' weights kept in pinned CPU memory, each streamed to the GPU ahead of its use
    # (finetune/training/block_offload.py); None: every weight on the accelerator
    offload: Optional[OffloadOptions] = None


@dataclass
class CheckpointOptions:
    every: int = 500  # optimizer steps between checkpoints; 0: none but the final artifact
    keep: int = 3
    # optimizer steps between loadable copies of the artifact in output_dir/snapshots/step-N/; 0: none
    snapshot_every: int = 0


@dataclass
class SampleOptions:
    every: int = 0  # optimizer steps between sample grids; 0: never
    # each a prompt, or a mapping {prompt, negative_prompt, seed, steps, guidance, width, height} overriding the
    # settings below for it (finetune/training/sample_prompts.py)
    prompts: list[Any] = field(default_factory=list)
    prompt_file: Optional[str] = None  # a kohya-style prompt file: one prompt per line with --n --w --h --d --l --s
    negative_prompt: str = ""
    steps: int = 25
    guidance_scale: float = 7.5
    seed: int = 0
    images_per_prompt: int = 1


@dataclass
class LogOptions:
    to: list[Literal["tensorboard", "wandb"]] = field(default_factory=list)
    project: str = "finetune"
    run_name: Optional[str] = None
    every: int = 1  # optimizer steps between logged scalars


@dataclass
class PriorOptions:
    """Prior preservation against overfitting and language drift (DreamBooth, Ruiz et al. 2023), for any strategy.

    class_images: the frozen base draws `num_class_images` images of `class_prompt` once (cached under
    `class_data_dir`, keyed by base, prompts, resolution, seed and sampler); every batch then holds as many class
    samples as instance samples, and loss = instance loss + loss_weight x class loss.
    base_prediction: no images; class prompts on noised instance latents are regressed onto the frozen base's
    own prediction for them.
    """

    mode: Literal["none", "class_images", "base_prediction"] = "none"
    class_prompt: list[str] = field(default_factory=list)  # one prompt or a list; images cycle through them
    loss_weight: float = 1.0
    num_class_images: int = 100
    class_data_dir: Optional[str] = None  # None: ~/.cache/finetune/class_images (or $FINETUNE_CACHE)
    steps: int = 25  # sampler steps when drawing class images
    guidance_scale: float = 7.5
    negative_prompt: str = ""
    seed: int = 0
    generation_batch_size: int = 4


@dataclass
class CacheOptions:
    """Work done once instead of every step (see finetune/data/caches.py).

    latents: the VAE's latent distribution (mean and std) of every training and class image, per size and flip;
    each step still draws its own latent sample from it, so a cached run trains exactly as an uncached one.
    "auto": in memory, or on disk when they would take more than 2 GB; off, with a message, where they cannot be
    right (random crops). text: the text encoder's output for every caption, when nothing trains it.
    Once both are built, the VAE and the text encoder leave the accelerator (`offload`). text_encoders: while the
    caches fill, the text encoders sit on the accelerator `together`, or come one at a time, each only while it
    encodes (`one_at_a_time`: the largest of them, not their sum; one transfer each way per batch of captions;
    for a family with several large encoders, HiDream's four).
    """

    latents: Literal["auto", "memory", "disk", "off"] = "auto"
    text: Literal["auto", "on", "off"] = "auto"
    dir: Optional[str] = None  # disk latents; None: ~/.cache/finetune/latents (or $FINETUNE_CACHE)
    offload: bool = True
    text_encoders: Literal["together", "one_at_a_time"] = "together"


@dataclass
class ValidationOptions:
    """A validation score per run: the loss on held-out images at fixed noise and fixed timesteps spread over the
    schedule (finetune/training/validation.py), comparable between steps and runs."""

    images: Optional[str] = None  # a folder of held-out images (with captions), or a fraction of the data: "0.1"
    every: int = 0  # optimizer steps between validation scores; 0: never
    timesteps: int = 8  # fixed timesteps (or sigmas) spread over the schedule, each image scored at all of them
    seed: int = 0  # of the fixed noise
    clip_model: Optional[str] = None  # CLIP score of the sample grids against their prompts: local folder or hub id
    dino_model: Optional[str] = None  # DINO similarity of the sample grids to the training images


@dataclass
class StrategyOptions:
    """Common to every strategy; each strategy subclasses it with its own fields."""

    kind: str = required()
    # None: train.learning_rate
    learning_rate: Optional[float] = None

    def changes_text_encoding(self) -> Optional[str]:
        """Why the text encoder's output for a caption changes during training (so it cannot be cached), or
        None. A strategy that trains the text encoder or rewrites captions overrides this."""
        return None

    @property
    def trains_base_weights(self) -> bool:
        """Whether the strategy trains the base model's own weights (DreamBooth), not layers or vectors added to
        it: those weights must stay in full precision (no model.quantize), and they are what FSDP shards."""
        return False


@dataclass
class Recipe:
    model: ModelOptions
    strategy: StrategyOptions
    data: DataOptions
    output_dir: str = required()
    train: TrainOptions = field(default_factory=TrainOptions)
    prior: PriorOptions = field(default_factory=PriorOptions)
    cache: CacheOptions = field(default_factory=CacheOptions)
    checkpoint: CheckpointOptions = field(default_factory=CheckpointOptions)
    sample: SampleOptions = field(default_factory=SampleOptions)
    validation: ValidationOptions = field(default_factory=ValidationOptions)
    log: LogOptions = field(default_factory=LogOptions)
    # where the recipe came from, and the command line's key=value overrides, for messages (the resume command)
    # and metadata; not YAML keys
    source: str = field(default="<recipe>", metadata={"internal": True})
    overrides: list[str] = field(default_factory=list, metadata={"internal": True})
