"""`finetune validate RECIPE`: every check that needs no model, the data included, and the data summary training
prints. Images are proven readable by their headers (fast for thousands) or, with `decode`, decoded whole as
training does; caption lengths are measured with the base's tokenizer alone where it is a local folder."""
from __future__ import annotations

from pathlib import Path

import torch

from finetune.data import BatchOrder
from finetune.data.buckets import format_report
from finetune.data.captions import caption_report
from finetune.data.control import slot_problem, slots_of, summary_line as control_line
from finetune.data.masks import summary_line as mask_line
from finetune.data.prepare import held_out_fraction, prepare_data, trained_examples
from finetune.models import family_for, family_told
from finetune.recipe.load import RecipeError, load_recipe
from finetune.strategies import create_strategy
from finetune.training.sample_prompts import sample_prompt_lines
from finetune.training.resume import OutputDirInUse, check_output_dir
from finetune.training.summary import data_lines, images_per_folder, length_line
from finetune.training.validation import folder_examples


def validate(path: str, overrides: list[str], decode: bool = False) -> list[str]:
    """The lines to print for a recipe that passes; raises the toolkit's errors (RecipeError, DataError,
    UnsupportedFamily, ...) naming what does not."""
    recipe = load_recipe(path, overrides)
    t, d = recipe.train, recipe.data
    prepared = prepare_data(d, t.batch_size, decode=decode, held_out_fraction=held_out_fraction(
        recipe.validation.images), held_out_seed=recipe.validation.seed)
    examples = prepared.examples
    order = BatchOrder(len(examples), d.repeats, t.batch_size, 1, 0, t.seed, groups=prepared.groups,
                       example_repeats=[e.repeats for e in examples])
    strategy = create_strategy(recipe.strategy)
    lines = [format_report(prepared.bucket_report)] if prepared.bucket_report is not None else []  # as training
    lines += data_lines(images_per_folder(trained_examples(prepared), d.repeats))
    lines += [line for line in [mask_line(d.masks, d.unmasked_weight)] if line]
    lines += _control_lines(recipe, prepared)
    lines += _validation_lines(recipe, prepared) + _caption_lines(recipe, examples, strategy)
    lines += _output_dir_lines(recipe, strategy)
    lines += sample_prompt_lines(recipe)
    lines += [length_line(t.max_steps, t.batch_size, 1, t.gradient_accumulation_steps, order.batches_per_epoch)
              + " (on 1 process; N processes multiply the batch)",
              f"base: {recipe.model.base}", f"output: {Path(recipe.output_dir).resolve()}",
              f"{path}: ok ({recipe.strategy.kind} on {recipe.model.base}, {t.max_steps} steps; images "
              + ("decoded" if decode else "checked by their headers; --decode decodes each as training does") + ")"]
    return lines


def _control_lines(recipe, prepared) -> list[str]:
    """The pairs counted (data.control); raises RecipeError when the family known from the recipe takes fewer
    control images per sample than the data gives (a hub base's family is checked when training looks it up)."""
    if recipe.data.control is None:
        return []
    family = family_told(recipe.model.family, recipe.model.base)
    problem = slot_problem(slots_of(prepared.examples), family.spec) if family is not None else None
    if problem:
        raise RecipeError(recipe.source, [problem])
    return [control_line(trained_examples(prepared), recipe.data.control)]


def _validation_lines(recipe, prepared) -> list[str]:
    """How many images the validation score reads (a folder's are read here, as data.images's are)."""
    v = recipe.validation
    if v.images is None:
        return []
    if prepared.held_out:
        held = f"{len(prepared.held_out)} of the training images held out (validation.images: {v.images}), not trained on"
    else:
        held = f"{len(folder_examples(v, recipe.data))} image(s) in {v.images}"
    return [f"validation: {held}; each scored at {v.timesteps} fixed timesteps"]


def _output_dir_lines(recipe, strategy) -> list[str]:
    """What `finetune train` will say of output_dir (it refuses one in use without --resume latest or
    --overwrite): a note, since the recipe itself is fine."""
    output_dir = Path(recipe.output_dir)
    try:
        check_output_dir(output_dir, output_dir / strategy.artifact_name, None, False, recipe.source,
                         recipe.overrides)
    except OutputDirInUse as exc:
        return [f"note: `finetune train` as it stands will stop: {exc}"]
    return []


def _caption_lines(recipe, examples, strategy) -> list[str]:
    """Caption lengths against the window, from the base's tokenizer alone (a local pipeline folder); raises
    DataError for a textual-inversion placeholder that would be cut."""
    family = family_for(recipe.model.family, recipe.model.base)
    tokenizer = family.tokenizer_of(recipe.model.base)
    if tokenizer is None:
        return ["captions: lengths are checked when the model loads (model.base is not a local folder)"]
    return caption_report(tokenizer, strategy.prompts([e.caption for e in examples], torch.Generator()),
                          [e.name for e in examples], family.caption_window(tokenizer, recipe.data.max_token_length),
                          strategy.kept_words())
