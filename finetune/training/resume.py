"""Never lose a finished result, and resume the run that was meant.

- `check_output_dir`: a new run refuses an output_dir that already holds a finished artifact or another run's
  checkpoints (before any model loads), unless told `--resume` or `--overwrite`.
- `resume_command`: the exact command that continues this run, command-line overrides included and
  shell-quoted, for every message that says how to go on (Ctrl-C, a full disk).
- `load_for_resume`: a damaged checkpoint is named, with the newest good one and the command that resumes it.
- `recipe_changes`: what differs between the recipe a checkpoint was made with and the one resuming it; what may
  change mid-run is said with its effect, what may not is refused.
"""
from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path
from typing import Any, Iterable

from finetune.training.checkpoint import (CheckpointError, DamagedCheckpoint, checkpoints_dir, find_checkpoint,
                                         good_checkpoints, load_checkpoint, step_of)
from finetune.training.ema import RAW_FOLDER

_NEW_RATE = ("the optimizer's param groups and the schedule's base rates take {new} from the resumed step on "
             "(the Adam moments are kept)")
_NEW_SCHEDULE = ("the rate of each step from the resumed one on is the new schedule's at that step, as if the run "
                 "had used it from the start")

# what may differ on resume, with what the change does; everything else would make the resumed run another run
# (its data order, what trains, the numbers it computes) and is refused
MAY_CHANGE = {
    "train.max_steps": "training goes on to step {new} instead of {old}; a schedule that depends on the length "
                       "(linear, cosine, ...) follows the new length from here",
    "output_dir": "files from here on go to {new}",
    "checkpoint.": "applies from this step on",
    "sample.": "applies from this step on",
    "log.": "applies from this step on",
    "cache.": "applies from this step on (what is cached changes speed and memory, not the results)",
    "data.num_workers": "changes loading speed only",
    "train.gradient_checkpointing": "changes memory and speed only",
    "train.compile": "changes speed only",
    "train.attention": "changes speed only (which attention kernels run)",
    "train.channels_last": "changes speed only",
    # block offload moves frozen weights, not what they compute: the way on for a run that ran out of memory
    "train.offload": "changes memory and speed only",
    "train.offload.": "changes memory and speed only",
    "validation.every": "scores from this step on (a score changes nothing that trains)",
    "validation.timesteps": "scores from this step on at the new timesteps; earlier scores are not comparable",
    "validation.clip_model": "applies to the grids from this step on",
    "validation.dino_model": "applies to the grids from this step on",
    # the way out of a NaN loss (training/failures.py suggests it): the rate and its schedule only set how far
    # each step moves (not the data order, what trains or how the loss is computed): the run goes on as itself
    "train.learning_rate": _NEW_RATE,
    "strategy.learning_rate": _NEW_RATE,
    "strategy.text_encoder_learning_rate": _NEW_RATE,
    "strategy.text_encoder_2_learning_rate": _NEW_RATE,
    "train.lr_scheduler": _NEW_SCHEDULE,
    "train.lr_warmup_steps": _NEW_SCHEDULE,
    "train.max_grad_norm": "gradients are clipped at the new norm (0: not at all) from the resumed step on",
    # the way out of a crash or overflow of one precision (trained weights and optimizer state are fp32 in any)
    "train.mixed_precision": "the base computes with mixed precision {new} instead of {old} from this step on (with "
                             "model.dtype auto it also loads in that precision); the trained weights and the optimizer's state are fp32 "
                             "either way, so they carry on, but the result is not bit-identical to an "
                             "uninterrupted run in either precision",
}


class OutputDirInUse(CheckpointError):
    """output_dir holds a finished artifact or checkpoints, and neither --resume nor --overwrite was given."""


def train_command(source: str, overrides: Iterable[str] = (), *extra: str) -> str:
    """`finetune train RECIPE OVERRIDES... EXTRA...`, each word shell-quoted: this run's own command with `extra`
    added (a later `key=value` wins over an earlier one), as every message that suggests a command prints it."""
    return "finetune train " + shlex.join([source, *overrides, *extra])


def resume_command(source: str, overrides: Iterable[str] = (), which: str = "latest") -> str:
    """`finetune train RECIPE OVERRIDES... --resume latest` (or `which`, a checkpoint folder), each word
    shell-quoted, so pasting it resumes this run (same output_dir, same settings)."""
    return train_command(source, overrides, "--resume", which)


def load_for_resume(path: Path, source: str, overrides: Iterable[str] = ()) -> tuple[dict, dict, dict]:
    """checkpoint.load_checkpoint(path); a damaged checkpoint raises CheckpointError naming it, what is wrong,
    and the newest good checkpoint before it with the exact command that resumes from there."""
    try:
        return load_checkpoint(path)
    except DamagedCheckpoint as exc:
        step = step_of(path)
        good = good_checkpoints(path.parent, before=step) if step is not None else []
        if good:
            way = (f"Resume from the newest good one, {good[0]} (the steps after it are trained again, as they "
                   f"were): {resume_command(source, overrides, str(good[0]))}")
        else:
            way = ("No good checkpoint is left before it: train again from the start with --overwrite: "
                   f"{train_command(source, overrides, '--overwrite')}")
        raise CheckpointError(f"{exc}. {way}") from None


def check_output_dir(output_dir: Path, artifact: Path, resume: str | None, overwrite: bool, source: str,
                     overrides: Iterable[str] = ()) -> list[Path]:
    """Raise OutputDirInUse when a run started this way would write over what `output_dir` holds: a finished
    `artifact` or checkpoints (without --resume), or a finished artifact with nothing to resume (with
    --resume latest). The message prints each way on as a whole command (this run's recipe `source` and
    `overrides`, with what changes), one a line, so it can be pasted as printed. With `overwrite`, returns the
    earlier run's checkpoints (and train.ema's raw/ folder) for the caller to remove."""
    if resume and overwrite:
        raise OutputDirInUse("--resume continues a run and --overwrite starts a new one: give one of them")
    if resume and resume != "latest":
        return []  # an explicit checkpoint folder: the user named what to continue
    newest = find_checkpoint(output_dir, "latest")
    finished = artifact.exists()
    if overwrite:
        # its checkpoints, and train.ema's trained weights beside its artifact (a run without EMA writes none, and
        # would leave the earlier run's there under its own artifact)
        raw = output_dir / RAW_FOLDER / artifact.name  # only that file: raw/ may hold a user's own files
        return [p for p in (checkpoints_dir(output_dir), raw) if p.exists()]
    if resume and (newest is not None or not finished):
        return []  # a checkpoint to continue from, or nothing yet (a run killed before its first checkpoint)
    held = ([f"a finished artifact ({artifact})"] if finished else []) + (
        [f"checkpoints up to {newest.name}"] if newest is not None else [])
    if not held:
        return []  # nothing finished to lose
    anew = train_command(source, overrides, "output_dir=PATH")
    replace = train_command(source, overrides, "--overwrite")
    if resume:
        raise OutputDirInUse(
            f"--resume latest: nothing to resume in {output_dir}: it holds {held[0]} and no checkpoint; nothing "
            f"was changed. To train again, in a new output_dir (PATH) or over this one (--overwrite):\n  {anew}\n"
            f"  {replace}")
    # a finished run's checkpoints are not offered: resuming one would retrain its last steps over the artifact
    ways = [f"continue that run:\n  {resume_command(source, overrides)}"] if newest is not None and not finished \
        else []
    removed = "its checkpoints are removed now, its artifact" if newest is not None else "its artifact is replaced"
    ways += [f"keep it and train anew, in a new output_dir (PATH):\n  {anew}",
             f"replace it ({removed} when this run saves):\n  {replace}"]
    raise OutputDirInUse(f"output_dir {output_dir} already holds {' and '.join(held)}; nothing was changed. To "
                         + "\nTo ".join(ways))


def checkpoint_to_resume(output_dir: Path, resume: str | None, current: dict, source: str,
                         overrides: Iterable[str] = ()) -> tuple[Path | None, tuple[dict, dict, dict] | None, list[str]]:
    """The checkpoint `resume` ("latest" or a folder) asks for, its state (load_for_resume), checked against the
    resuming recipe (`current`, as recipe_to_dict gives it), and the lines to say; (None, None, lines) to start at
    step 0."""
    path = find_checkpoint(output_dir, resume) if resume else None
    if path is None:
        return None, None, ([f"--resume latest: no checkpoint in {checkpoints_dir(output_dir)} yet; starting at "
                             "step 0"] if resume else [])
    saved = load_for_resume(path, source, overrides)
    return path, saved, [f"resume: {note}" for note in check_resumable(saved[0], current, path, source, overrides)]


def remove_earlier_run(paths: list[Path]) -> None:
    """Remove what check_output_dir returned: folders whole, files one by one (and their folder, once empty)."""
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
            if path.parent.name == RAW_FOLDER and not any(path.parent.iterdir()):
                path.parent.rmdir()


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        flat: dict[str, Any] = {}
        for key, value in data.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: data}


def recipe_changes(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(notes, refusals) for every dotted key whose value differs between the checkpoint's resolved recipe and
    this one: notes for keys in MAY_CHANGE (with their effect), refusals for the rest."""
    old, new = _flatten(saved), _flatten(current)
    notes, refusals = [], []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key), new.get(key)
        if before == after:
            continue
        rule = next((effect for prefix, effect in MAY_CHANGE.items()
                     if key == prefix or (prefix.endswith(".") and key.startswith(prefix))), None)
        change = f"{key}: {before!r} in the checkpoint's run, {after!r} now"
        if rule is None:
            refusals.append(change)
        else:
            notes.append(f"{change}: {rule.format(old=before, new=after)}")
    return notes, refusals


# what the model section of an earlier version held for every family, unset
_UNSET_EARLIER = {"text_encoder_3": "auto", "guidance": None, "prediction_type": None}
# keys added to a section since, with the value that behaves as the runs before them did: a checkpoint that lacks
# one ran that way (a key whose default is None needs no entry: a missing key compares as None)
_ADDED_SINCE = {"data": {"unmasked_weight": 0.0}}


def as_now(saved: dict, current: dict) -> dict:
    """A checkpoint's recipe from before the family options moved into the model section (recipe/load.py MOVED),
    as this version writes it: the moved keys at their new place, and the keys every family's model section held
    then dropped where this family does not read them and they were unset."""
    from finetune.recipe.load import MOVED

    saved = json.loads(json.dumps(saved))  # a copy
    model, now = saved.get("model", {}), current.get("model", {})
    for old, new in MOVED.items():
        section, _, key = old.partition(".")
        holder = saved.get(section) if key else saved
        if isinstance(holder, dict) and (key or section) in holder:
            value = holder.pop(key or section)
            if new.split(".", 1)[1] in now:
                model[new.split(".", 1)[1]] = value
    for key, unset in _UNSET_EARLIER.items():
        if key in model and key not in now and model[key] == unset:
            del model[key]
    for section, added in _ADDED_SINCE.items():
        if isinstance(saved.get(section), dict):
            for key, value in added.items():
                saved[section].setdefault(key, value)
    return saved


def check_resumable(saved_state: dict, current: dict, path: Path, source: str = "<recipe>",
                    overrides: Iterable[str] = ()) -> list[str]:
    """Compare the checkpoint at `path` (its state.json, `saved_state`) with the resuming recipe (`current`, as
    recipe_to_dict gives it; `source` and `overrides`, its command); return the notes to print, or raise
    CheckpointError naming every setting that cannot change mid-run, with the commands of a new run. A
    checkpoint from before whole recipes were kept is compared on model and strategy."""
    saved = saved_state.get("recipe") or {k: saved_state[k] for k in ("model", "strategy") if k in saved_state}
    saved = as_now(saved, current)
    notes, refusals = recipe_changes(saved, {k: current[k] for k in saved if k in current})
    if refusals:
        raise CheckpointError(
            f"checkpoint {path} was made by a different recipe, with settings that cannot change mid-run:\n  - "
            + "\n  - ".join(refusals) + f"\nSet them back (the checkpoint's whole recipe is in {path}/state.json), "
            "or start a new output_dir (PATH) or train over this one (--overwrite) for a new run:\n  "
            + train_command(source, overrides, "output_dir=PATH") + "\n  "
            + train_command(source, overrides, "--overwrite"))
    return notes
