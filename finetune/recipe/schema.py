"""The recipe: typed sections whose field names are the YAML keys users write.

Every field is declared with `key(default, help, bounds)` or `required(help)` (finetune/recipe/keys.py): its help
text is the recipe reference (docs/recipes.md), its bounds are checked where every key is read.
The `data`, `prior` and `cache` sections live in finetune/recipe/data_schema.py and are re-exported here.
Strategy options live with each strategy (see `finetune.strategies`), because only the strategy knows them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from finetune.recipe.data_schema import (  # noqa: F401  (re-exported)
    CacheOptions, ControlOptions, DataOptions, PriorOptions)
from finetune.recipe.keys import key, required  # noqa: F401  (required: strategies import it from here)

LrScheduler = Literal[
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
]


# a family's options class (its file in finetune/models/) extends this, as each strategy's class extends
# StrategyOptions; the family's own keys (its objective's included) follow these on the reference page
@dataclass
class ModelOptions:
    """The base model to train on and how it is loaded. Each family adds its own keys, listed after the common
    ones."""

    base: str = required(
        "The model to train on: a hub id (`owner/name`), a local diffusers folder, or a single "
        "`.safetensors`/`.ckpt` checkpoint file.")
    revision: Optional[str] = key(None, "The hub revision (branch, tag or commit) of `model.base`; null: its "
                                        "default branch.")
    variant: Optional[str] = key(None, "Which weight files of a hub repository to load, e.g. `fp16`; null: the "
                                       "full-precision ones.")
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = key(
        "auto", "The precision the frozen base is kept in. `auto` follows `train.mixed_precision`; `fp16` or "
        "`bf16` needs the same `train.mixed_precision`.")
    family: str = key(
        "auto", "Which model family the base is (`sd`, `sdxl`, `sd3`, `flux`, ...: the names of the Model families "
        "pages). `auto` tells it from a diffusers folder's `model_index.json` or a single file's keys; a hub id or "
        "`.ckpt` that cannot be read before loading is taken as `sd` unless set here.")
    quantize: Literal["none", "int8", "fp8", "int8_w8a8", "fp8_w8a8"] = key(
        "none", "Store the frozen denoiser's Linear weights in 8 bits (torchao) for LoRA-type strategies on large "
        "transformers; the adapters stay in full precision. `int8`/`fp8` multiply in the compute dtype, "
        "`int8_w8a8`/`fp8_w8a8` also quantize activations and multiply in 8 bits (faster on GPUs with 8-bit "
        "tensor cores; fp8 needs compute capability 8.9+).")
    config: Optional[str] = key(
        None, "For a single-file checkpoint: a diffusers folder or hub id holding the matching configs; null: "
        "diffusers infers them from the checkpoint.")
    vae: Optional[str] = key(
        None, "Another VAE in place of the base's: a folder holding one, a pipeline folder (its `vae/`), a single "
        "file, or a hub id such as `stabilityai/sd-vae-ft-mse`. Training encodes and sample grids decode with it.")

    def problems(self) -> list[str]:
        """What is wrong with the family's own options (a family's class extends this)."""
        return []


@dataclass
class EmaOptions:
    """train.ema: an fp32 moving average of what trains, saved as the artifact (the raw weights beside it)."""

    decay: float = key(
        0.999, "How slowly the average follows the trained weights: 0.999 averages about the last 1000 updates, "
        "0.99 the last 100.", minimum=0, below=1, hint="0.999 averages about the last 1000 updates, 0.99 the last "
        "100")
    update_every: int = key(1, "Optimizer steps between updates of the average (at most `train.max_steps`).",
                            minimum=1)
    device: Literal["accelerator", "cpu"] = key(
        "accelerator", "Where the average is kept: `cpu` keeps it in CPU memory (large DreamBooth runs).")


@dataclass
class OffloadOptions:
    """train.offload: block offload for large transformers on small cards."""

    blocks: float = key(
        0, "How many transformer blocks stream from CPU memory: a count (1, 2, ...) or a fraction of them (0.5); "
        "`train.offload` needs it.")


@dataclass
class TrainOptions:
    """How the training steps run: how many, their batch, the learning rate and optimizer, the precision, and the
    options that trade speed for memory."""

    max_steps: int = key(1000, "Optimizer steps to train, whatever the number of processes.", minimum=1)
    seed: int = key(0, "The seed of everything random in the run.")
    batch_size: int = key(1, "Images per process and micro-step.", minimum=1)
    gradient_accumulation_steps: int = key(
        1, "Micro-steps whose gradients add up to one optimizer step; the effective batch is batch_size x "
        "processes x this.", minimum=1)
    learning_rate: float = key(1e-4, "The optimizer's learning rate (a strategy may set its own).", above=0)
    lr_scheduler: LrScheduler = key(
        "constant", "How the learning rate changes over the run after the warmup (diffusers' schedulers).")
    lr_warmup_steps: int = key(
        0, "Steps of linear warmup: step N trains at N / lr_warmup_steps of the rate, so the last warmup step is at "
        "the full rate; at most `train.max_steps`.", minimum=0)
    optimizer: Literal["adamw", "adamw8bit", "prodigy", "adafactor", "lion", "schedule_free_adamw"] = key(
        "adamw", "`adamw8bit` needs bitsandbytes; `prodigy`, `adafactor`, `lion` and `schedule_free_adamw` need "
        "`finetune[optimizers]`. The `adam_*` keys map to the other optimizers where they mean the same.")
    optimizer_args: dict[str, Any] = key(
        help="The optimizer's own arguments by its library's names (`{d_coef: 0.5}` for prodigy), checked against "
        "its constructor before any model loads.", factory=dict)
    adam_beta1: float = key(0.9, "Adam's first-moment decay (its `betas[0]`).", minimum=0, below=1)
    adam_beta2: float = key(0.999, "Adam's second-moment decay (its `betas[1]`).", minimum=0, below=1)
    adam_weight_decay: float = key(1e-2, "Decoupled weight decay, as AdamW's.", minimum=0)
    adam_epsilon: float = key(1e-8, "Adam's epsilon, added to the denominator for stability.", minimum=0)
    max_grad_norm: float = key(1.0, "Clip the gradients' norm to this; 0 turns clipping off.", minimum=0,
                               hint="0 turns clipping off")
    mixed_precision: Literal["no", "fp16", "bf16"] = key(
        "no", "Compute in `fp16` (GPU only) or `bf16`; the trained weights stay fp32.")
    gradient_checkpointing: bool = key(
        False, "Recompute activations in the backward pass: much less memory, about 30% slower.")
    compile: Literal["auto", "off", "blocks", "full", "max"] = key(
        "auto", "torch.compile of the denoiser, adapter layers inside: `blocks` each repeated block once, `full` "
        "the whole denoiser, `max` the whole denoiser with CUDA graphs and autotuned kernels (a CUDA GPU, one "
        "batch shape). `auto`: `blocks` on CUDA, `off` elsewhere; an older recipe's `true` reads as `full`.")
    attention: Literal["auto", "flash", "efficient", "cudnn", "math"] = key(
        "auto", "The attention kernels (PyTorch's scaled_dot_product_attention) of the training steps. `auto`: "
        "PyTorch's choice, less those known to fail for this torch and GPU; one the device cannot run is refused "
        "before loading.")
    channels_last: bool = key(False, "Denoiser weights and inputs in NHWC memory format, faster convolutions on "
                                     "many GPUs.")
    ema: Optional[EmaOptions] = key(
        None, "An fp32 exponential moving average of the trained weights, saved as the artifact (the trained "
        "weights themselves in `raw/`); e.g. `{decay: 0.999}`. null: none.")
    offload: Optional[OffloadOptions] = key(
        None, "Keep the frozen weights of some transformer blocks in pinned CPU memory, each streamed to the GPU "
        "ahead of its use; e.g. `{blocks: 8}`, with `gradient_checkpointing`. null: every weight on the "
        "accelerator.")


@dataclass
class CheckpointOptions:
    """Checkpoints a run resumes from (`finetune train --resume`), and loadable copies of the artifact along the
    way."""

    every: int = key(500, "Optimizer steps between checkpoints; 0: none but the final artifact.", minimum=0)
    keep: int = key(3, "How many of the newest checkpoints are kept; older ones are deleted.", minimum=1)
    snapshot_every: int = key(
        0, "Optimizer steps between loadable copies of the artifact in `output_dir/snapshots/step-000100/`; 0: "
        "none.", minimum=0)


@dataclass
class SampleOptions:
    """Sample grids drawn during training with the weights as trained so far, written to
    `output_dir/samples/step-000100.png`."""

    every: int = key(0, "Optimizer steps between sample grids; 0: none.", minimum=0)
    prompts: list[Any] = key(
        help="The grid's prompts: each a prompt, or a mapping `{prompt, negative_prompt, seed, steps, guidance, "
        "width, height, control_image}` that overrides the settings below for it; `control_image`: an edit "
        "model's control image (a path, or a list of paths, one per control image), shown before the results.",
        factory=list)
    prompt_file: Optional[str] = key(
        None, "A kohya-style prompt file instead: `.txt` with one prompt per line and its `--n --w --h --d --l "
        "--s` options, or `.toml` or `.json`.")
    negative_prompt: str = key("", "The negative prompt of every grid prompt.")
    steps: int = key(25, "Sampler steps per image.", minimum=1)
    guidance_scale: float = key(7.5, "Classifier-free guidance scale.", minimum=0)
    seed: int = key(0, "The first prompt's seed (the next prompt's is one more), the same in every grid of the "
                                "run so grids compare.")
    images_per_prompt: int = key(1, "Images per prompt in each grid.", minimum=1)


@dataclass
class LogOptions:
    """Where the training scalars (loss, learning rate, validation score) are logged."""

    to: list[Literal["tensorboard", "wandb"]] = key(
        help="The trackers: `tensorboard` (under `output_dir/logs/`) and/or `wandb` (offline with "
        "`WANDB_MODE=offline`); empty: no tracker.", factory=list)
    project: str = key("finetune", "The project name: W&B files the run under it, TensorBoard writes into a "
                                   "folder of that name.")
    run_name: Optional[str] = key(None, "The run's name in W&B; null: W&B's own.")
    every: int = key(1, "Optimizer steps between logged scalars.", minimum=1)


@dataclass
class ValidationOptions:
    """A validation score during training: the loss on held-out images at fixed noise and fixed timesteps spread
    over the schedule, comparable between steps and runs."""

    images: Optional[str] = key(
        None, "A folder of held-out images (with captions), or the fraction of the training images to hold out "
        "(`0.1`); null: no validation score.")
    every: int = key(0, "Optimizer steps between validation scores; 0: at the last step only.", minimum=0)
    timesteps: int = key(8, "Fixed timesteps (or sigmas) spread over the schedule; each held-out image is scored "
                            "at all of them.", minimum=1, hint="8 is usual")
    seed: int = key(0, "The seed of the fixed noise, and of which images a fraction holds out.")
    clip_model: Optional[str] = key(
        None, "Score each sample grid against its prompts with this CLIP model (a folder or hub id, e.g. "
        "`openai/clip-vit-base-patch32`); needs `sample.every`.")
    dino_model: Optional[str] = key(
        None, "Score each sample grid's likeness to the training images with this DINO model (a folder or hub id, "
        "e.g. `facebook/dinov2-small`); needs `sample.every`.")


# common to every strategy; each strategy subclasses it with its own fields (finetune/strategies/)
@dataclass
class StrategyOptions:
    """What trains and how. `strategy.kind` chooses the strategy; each kind's own keys are listed after the common
    ones."""

    kind: str = required("The strategy: `lora`, `dreambooth`, `textual_inversion` or `hypernetwork`.")
    learning_rate: Optional[float] = key(None, "The strategy's own learning rate; null: `train.learning_rate`.",
                                         above=0)

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
    """A whole recipe: one field per section, and the output folder."""

    model: ModelOptions
    strategy: StrategyOptions
    data: DataOptions
    output_dir: str = required("The folder the run writes to: its artifact, checkpoints, samples and logs.")
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
