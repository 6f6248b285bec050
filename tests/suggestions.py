"""What a message suggests, and whether it works as printed (issue 32: "every command a message suggests must work
as printed"). A message may suggest

- a recipe setting, `section.key: value` or `section.key=value`: the key must exist in the schema and the value
  must type-check and be one of the key's choices (an upper-case word such as PATH or N stands for the user's own);
- a `finetune ...` command: finetune's own argparse must accept it, and the `key=value` overrides of
  `finetune train|validate` must pass as above (a bare `finetune report` names a command, it is not one to run);
- a `pip install ...` command: every requirement must parse, and `finetune[extra]` name an extra pyproject has;
- an `hf download ...` command: huggingface_hub's `hf` must be installed beside this Python and take its options.

`problems(text)` returns what does not work, one line each; tests/cli/test_suggested_commands.py and
tests/cli/test_bad_inputs.py apply it to every message they provoke.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import shlex
import subprocess
import sys
import tomllib
import types
import typing
from pathlib import Path

import yaml

from finetune.recipe.schema import Recipe

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = [f.name for f in dataclasses.fields(Recipe) if not f.metadata.get("internal")]
FILE_SUFFIXES = {"safetensors", "json", "jsonl", "txt", "png", "jpg", "yaml", "yml", "py", "pt", "ckpt", "bin",
                 "html", "md"}
# `section.key: value`, `section.key=value` or `output_dir=value`; not inside a path or a longer dotted name, nor
# quoted (a message quotes what the user wrote: "override 'train.max_step=10': ...")
SETTING = re.compile(r"(?<![\w./$'\"-])((?:%s)(?:\.\w+)+|output_dir)(=|: |:$)([^\s,;()`'\"]*)"
                     % "|".join(SECTIONS), re.M)
# where a problem is located rather than a setting suggested: the start of a message, line or listed problem
LOCATION = re.compile(r"(?:^|error: |note: |- |\n\s*)$")
OTHER_COMMANDS = re.compile(r"(?<![\w/.-])(pip install|hf download|huggingface-cli|accelerate launch) ")
MEANT = re.compile(r"did you mean '([\w.]+)'")  # a key (or a choice) closest to a misspelled one
PLACEHOLDER = re.compile(r"^[A-Z][A-Z_]*$")


def problems(text: str, in_source: bool = False) -> list[str]:
    """Every suggestion in `text` that would not work as printed: a misspelled key, a value the key refuses, a
    command or flag that does not exist. A message names where a problem lies too ("strategy.rnak: unknown key"):
    that key is the user's, unchecked, unless the text is a string of finetune's source (`in_source`), whose
    keys are finetune's own; there only backticked commands are read (see commands_in)."""
    found = [p for key, value, suggested in settings_in(text) if suggested or in_source
             for p in check_setting(key, value, suggested)]
    found += [p for key in MEANT.findall(text) if "." in key for p in check_setting(key, "", False)]
    found += [p for command in commands_in(text, printed_alone=not in_source) for p in check_command(command)]
    return found


def settings_in(text: str) -> list[tuple[str, str, bool]]:
    """(dotted key, value as printed, whether it is suggested rather than where a problem lies) for each setting
    named with a value in `text`."""
    out = []
    for match in SETTING.finditer(text):
        key, sign, value = match.groups()
        if key.rsplit(".", 1)[-1] in FILE_SUFFIXES:
            continue  # a file name such as model.safetensors
        located = sign != "=" and LOCATION.search(text[:match.start()]) is not None
        out.append((key, value.rstrip("."), not located))
    return out


def commands_in(text: str, printed_alone: bool = True) -> list[str]:
    """Each command as printed: inside backticks, up to the closing one; otherwise a `finetune` command that
    starts a line or follows ": " and runs to the line's end (as the resume and overwrite commands are printed;
    only with `printed_alone`, as a message prints it: a source string is a fragment), and the other commands up
    to the sentence's next bracket, comma or semicolon. A `finetune` word in prose ("finetune writes no ...", a
    page title) is no command."""
    commands = []
    finetune = re.compile(r"(?<![\w/.-])finetune ([a-z][\w-]*)(?=[\s`]|$)")
    for pattern in (finetune, OTHER_COMMANDS):
        for match in pattern.finditer(text):
            quoted = text[:match.start()].count("`") % 2 == 1
            if not quoted and pattern is finetune and (not printed_alone or match[1] not in _subcommands()):
                continue  # in backticks any `finetune WORD` is a command; in prose only a real command's name
            alone = re.search(r"(?:^|\n)\s*$|: $", text[:match.start()]) is not None
            if not quoted and pattern is finetune and not alone:
                continue
            stops = "`" if quoted else "\n" if pattern is finetune else "\n(),;"
            end = next((i for i in range(match.start(), len(text)) if text[i] in stops), len(text))
            commands.append(text[match.start():end].strip())
    return commands


@functools.cache
def _subcommands() -> tuple[str, ...]:
    from finetune.cli_arguments import parser as _parser

    return tuple(next(a for a in _parser()._actions if a.dest == "command").choices)


@functools.cache
def _strategy_classes() -> list[type]:
    from finetune.strategies import KINDS, options_class

    return [options_class(kind) for kind in KINDS]


def _unwrap_optional(hint: typing.Any) -> typing.Any:
    """X for Optional[X] (a section that is off unless given, such as train.ema); the hint itself otherwise."""
    inner = [a for a in typing.get_args(hint) if a is not type(None)]
    return inner[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(inner) == 1 else hint


def _hints(key: str) -> list[typing.Any]:
    """The type hints `key` may have (a strategy key: in each strategy that has it); [] for no such key."""
    section, *rest = key.split(".")
    if section == "strategy":
        classes = _strategy_classes()
    elif section == "model":  # each family's options (model.family chooses them)
        from finetune.models import specs

        classes = [spec.options for spec in specs().values()]
    else:
        hint = typing.get_type_hints(Recipe).get(section)
        classes = [hint] if hint is not None else []
    for name in rest[:-1]:  # a nested section, such as flow options under a family's key, or train.ema
        classes = [_unwrap_optional(typing.get_type_hints(c).get(name)) for c in classes]
        classes = [c for c in classes if dataclasses.is_dataclass(c)]
    if not rest:
        return list(classes)
    return [typing.get_type_hints(c)[rest[-1]] for c in classes
            if dataclasses.is_dataclass(c) and rest[-1] in {f.name for f in dataclasses.fields(c)}]


def check_setting(key: str, value: str, suggested: bool = True) -> list[str]:
    """[] when `key` exists and (if `suggested`) `value` passes the schema as the recipe loader reads it."""
    from finetune.recipe.typed import convert

    hints = _hints(key)
    if not hints:
        return [f"{key}: no such key in the recipe schema"]
    if not suggested or not value or PLACEHOLDER.match(value) or "\0" in value:  # "\0": a source's {...}
        return []
    try:
        raw = yaml.safe_load(value)
    except yaml.YAMLError:
        return [f"{key}: {value!r} is not valid YAML"]
    errors_each = []
    for hint in hints:
        errors: list[str] = []
        if convert(hint, raw, key, errors)[0]:
            return []
        errors_each.append("; ".join(errors))
    return [f"{key}: {value!r} is refused: {errors_each[0]}"]


def check_command(command: str) -> list[str]:
    """[] when `command` works as printed, as far as parsing it tells."""
    try:
        words = shlex.split(command)
    except ValueError as exc:
        return [f"{command!r}: the shell cannot split it ({exc})"]
    if words[:2] == ["pip", "install"]:
        return _check_pip(command, words[2:])
    if words[0] == "hf":
        return _check_hf(command, words[1:])
    if words[0] == "finetune":
        return _check_finetune(command, words[1:])
    if words[:2] == ["accelerate", "launch"] and (Path(sys.executable).parent / "accelerate").is_file():
        return []
    return [f"{command!r}: {words[0]} is not a command this environment has"]


def _check_finetune(command: str, words: list[str]) -> list[str]:
    from finetune.cli_arguments import parser as _parser

    if words[0] not in _subcommands():
        return [f"{command!r}: finetune has no command {words[0]!r}"]
    if len(words) == 1:
        return []  # the command's name, not a command line
    try:
        args = _parser().parse_args(words)
    except SystemExit:
        return [f"{command!r}: finetune's argparse refuses it"]
    found = []
    for item in getattr(args, "overrides", None) or []:
        key, sign, value = item.partition("=")
        found += check_setting(key, value) if sign else [f"{command!r}: {item!r} is not key=value"]
    return found


def _check_pip(command: str, words: list[str]) -> list[str]:
    from packaging.requirements import InvalidRequirement, Requirement

    found = []
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    words = iter(words)
    for word in words:
        if word in ("&&", "||", "|", ";"):
            break  # the next command of the line (`pip install ... && mkdocs serve`)
        local = re.fullmatch(r"\.\[([\w,-]+)\]", word)  # this checkout with extras: `pip install -e '.[docs]'`
        if local:
            found += [f"{command!r}: pyproject has no extra {e!r}" for e in local[1].split(",") if e not in extras]
        elif word in ("-c", "-r"):
            file = next(words, "")
            found += [] if (ROOT / file).is_file() else [f"{command!r}: no {file} in the repository"]
        elif word in (".", "-e", "-U", "--upgrade"):
            continue
        else:
            try:
                requirement = Requirement(word)
            except InvalidRequirement:
                found.append(f"{command!r}: {word!r} is no requirement pip reads")
                continue
            if requirement.name == "finetune":
                found += [f"{command!r}: pyproject has no extra {e!r}" for e in requirement.extras
                          if e not in extras]
    return found


def _check_hf(command: str, words: list[str]) -> list[str]:
    hf = Path(sys.executable).parent / "hf"
    if not hf.is_file():
        return [f"{command!r}: huggingface_hub installed no `hf` beside {sys.executable}"]
    shown = subprocess.run([str(hf), words[0], "--help"], capture_output=True, text=True)
    if shown.returncode != 0:
        return [f"{command!r}: hf has no command {words[0]!r}"]
    return [f"{command!r}: hf {words[0]} has no option {word}" for word in words[1:]
            if word.startswith("--") and word not in shown.stdout]
