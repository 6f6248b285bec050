"""The shell commands of README.md and the docs pages (issue 39: "every command in the docs is run by a test").

A fenced ```bash (or ```sh / ```shell) block whose previous line is exactly `<!-- runnable -->` is run as it stands
(tests/docs/test_commands.py). In every other such block each `finetune ...` command is parsed with finetune's own
argparse, and the `key=value` overrides of `finetune train|validate` are checked against the recipe schema, so a
renamed flag or key fails a test instead of the reader.

Commands are read as a shell reads them: `\\` continuations joined, `# comments` dropped, `a && b`, `a | b` and
`a; b` split into their commands, redirections dropped; `python -m finetune`, `accelerate launch ... -m finetune`
and `torchrun ... -m finetune` count as `finetune`. Usage notation is read too, so a page may show options: `[...]`
marks an optional part (its flags are checked as if given), `...` and a literal `key=value` are dropped, an
UPPER-CASE word (or `<name>`, read as NAME) stands for the reader's own value.
"""
from __future__ import annotations

import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNNABLE = "<!-- runnable -->"
SHELLS = {"bash", "sh", "shell"}
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
CONTROL = {"&&", "||", ";", "|", "&", "(", ")", "|&", ";;"}
ASSIGNMENT = re.compile(r"^[A-Za-z_]\w*=")  # VAR=value before a command: the command's environment
PREFIXES = {"time", "nohup", "exec", "env"}  # run the command that follows them
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$")
ANGLE_PLACEHOLDER = re.compile(r"<([A-Za-z][\w.-]*)>")
REPOSITORY_FOLDERS = ("recipes/", "data_examples/")  # paths a page may name: they must exist


@dataclass(frozen=True)
class Block:
    """One fenced shell block of a page."""
    page: str  # relative to the repository root, e.g. docs/training.md
    line: int  # the opening fence's line (1-based): where a failure points the writer
    text: str
    runnable: bool

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


@dataclass(frozen=True)
class Command:
    """A `finetune ...` command of a block that is parsed, not run."""
    page: str
    line: int  # the command's first line on its page
    text: str  # as written, continuations joined
    words: list[str]  # the whole command, a launcher's words included
    argv: list[str]  # the words after `finetune`

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def pages(root: Path = ROOT) -> list[Path]:
    """README.md and every page of docs/ (the generated recipe reference included)."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def shell_blocks(text: str, page: str) -> list[Block]:
    """Every fenced bash/sh/shell block of a page's text, with its indentation (a block in a list item) removed."""
    lines = text.splitlines()
    blocks, index = [], 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        indent, fence, language = opening.groups()
        end = index + 1
        while end < len(lines) and not (lines[end].strip().startswith(fence[0] * len(fence))
                                        and not lines[end].strip().strip(fence[0])):
            end += 1
        if language in SHELLS:
            body = [line[len(indent):] if line.startswith(indent) else line.lstrip() for line in lines[index + 1:end]]
            runnable = index > 0 and lines[index - 1].strip() == RUNNABLE
            blocks.append(Block(page, index + 1, "\n".join(body) + "\n", runnable))
        index = end + 1
    return blocks


def dangling_markers(text: str) -> list[int]:
    """Lines of `<!-- runnable -->` markers that no shell block follows at once: a block the writer meant to be run
    that no test would run."""
    lines = text.splitlines()
    return [number for number, line in enumerate(lines, 1) if line.strip() == RUNNABLE
            and not (number < len(lines) and (fence := FENCE.match(lines[number])) and fence[3] in SHELLS)]


def logical_lines(block: Block) -> list[tuple[int, str]]:
    """(line on the page, text) of each command line of a block, `\\` continuations joined."""
    out, pending, start = [], "", 0
    for offset, line in enumerate(block.text.splitlines(), 1):
        if not pending:
            start = block.line + offset
        if line.endswith("\\") and not line.endswith("\\\\"):
            pending += line[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    if pending:
        out.append((start, pending))
    return out


def strip_comment(line: str) -> str:
    """The line without its `# comment`: a `#` that starts a word outside quotes, as bash reads it."""
    quote = None
    for index, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index]
    return line


def simple_commands(line: str) -> list[list[str]]:
    """The words of each command of a shell line (`a && b | c; d`), redirections and their targets dropped."""
    lexer = shlex.shlex(ANGLE_PLACEHOLDER.sub(lambda m: re.sub(r"\W", "_", m[1]).upper(), strip_comment(line)),
                        posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = ""  # done by strip_comment, which knows that `a#b` is one word
    commands, words, skip = [], [], False
    for token in lexer:
        if skip:
            skip = False
        elif token in CONTROL:
            commands.append(words)
            words = []
        elif set(token) <= set("<>&|") and ("<" in token or ">" in token):
            skip = True  # `> file`, `2>&1`: the target is no argument
            if words and words[-1].isdigit():
                words.pop()  # the 2 of `2> file`
        else:
            words.append(token)
    commands.append(words)
    return [words for words in commands if words]


def finetune_argv(words: list[str]) -> list[str] | None:
    """The arguments after `finetune` when a command runs finetune (itself, `python -m finetune`, a launcher's
    `... -m finetune`); None otherwise. `python -m finetune.models.tiny` is another program."""
    while words and (ASSIGNMENT.match(words[0]) or words[0] in PREFIXES):
        words = words[1:]
    if words and words[0] == "finetune":
        return words[1:]
    for index in range(len(words) - 1):
        if words[index] == "-m" and words[index + 1] == "finetune":
            return words[index + 2:]
    return None


def commands_of(block: Block) -> list[Command]:
    """Every finetune command of a block, as the parse check reads it."""
    found = []
    for line, text in logical_lines(block):
        for words in simple_commands(text):
            argv = finetune_argv(words)
            if argv is not None:
                found.append(Command(block.page, line, text.strip(), words, argv))
    return found


def read_usage(argv: list[str]) -> list[str]:
    """The words argparse should see for a command written in usage notation: `[--out DIR]` as `--out DIR`, no
    `...`, no literal `key=value`. A bracket inside a word (`strategy.target_modules=[a,b]`) is YAML, and stays."""
    out = []
    for word in argv:
        word = word.lstrip("[")
        while word.endswith("]") and word.count("]") > word.count("["):
            word = word[:-1]
        if word and word not in ("...", "…") and word.lower() != "key=value":
            out.append(word)
    return out


def _subcommand_parsers() -> dict:
    from finetune.cli_arguments import parser

    top = parser()
    action = next(a for a in top._actions if a.dest == "command")
    return {"": top, **action.choices}


def _fill_placeholders(argv: list[str]) -> list[str]:
    """An UPPER-CASE value of a typed option (`--max-steps N`) becomes one the option takes, so argparse checks
    the option's name rather than the reader's value."""
    if not argv:
        return argv
    command = _subcommand_parsers().get(argv[0])
    if command is None:
        return argv
    filled = list(argv)
    for index in range(1, len(filled) - 1):
        action = command._option_string_actions.get(filled[index])
        if action is None or action.nargs == 0 or not PLACEHOLDER.match(filled[index + 1]):
            continue
        if action.choices:
            filled[index + 1] = str(next(iter(action.choices)))
        elif action.type in (int, float):
            filled[index + 1] = "1"
    return filled


def problems(argv: list[str], words: list[str] = ()) -> list[str]:
    """What does not work in `finetune <argv>`: argparse's own message for a flag, command or value it refuses,
    each override of train/validate whose key the schema lacks or whose value it refuses, a repository path
    (recipes/...) that does not exist. `words`: the whole command, launcher included, for its paths."""
    from finetune.cli_arguments import parser
    from tests.suggestions import check_setting

    argv = _fill_placeholders(read_usage(argv))
    shown = io.StringIO()
    try:
        with contextlib.redirect_stderr(shown), contextlib.redirect_stdout(io.StringIO()):
            args = parser().parse_args(argv)
    except SystemExit as stop:  # --help and --version stop with 0; a refusal with 2 and its message
        if stop.code in (0, None):
            return []
        message = shown.getvalue().strip().splitlines()
        return [message[-1] if message else f"argparse refused it (exit {stop.code})"]
    found = []
    if args.command in ("train", "validate"):
        for item in args.overrides:
            key, sign, value = item.partition("=")
            found += check_setting(key, value) if sign else [f"{item!r} is not key=value"]
    found += [f"{word}: no such file or folder in the repository" for word in [*words, *argv]
              if word.startswith(REPOSITORY_FOLDERS) and not PLACEHOLDER.match(Path(word).stem)
              and not (ROOT / word).exists()]
    return list(dict.fromkeys(found))


def page_problems(text: str, page: str) -> list[str]:
    """Every problem of the parsed (not runnable) commands of a page's text, each with page:line and the command;
    the parse check of a page in one call (tests feed it fake pages)."""
    return [f"{command.where}: {command.text}\n    {problem}"
            for block in shell_blocks(text, page) if not block.runnable
            for command in commands_of(block) for problem in problems(command.argv, command.words)]
