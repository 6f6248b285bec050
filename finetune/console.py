"""What the command line prints: the toolkit's own messages in one style, third-party warnings that do not apply
kept out of the way, and `--quiet` / `--verbose`.

Style: information as plain lines on stdout; `warning: ...` and `error: ...` on stderr. `--quiet` keeps only
warnings and errors (no progress bars); `--verbose` shows everything, the libraries' INFO lines and the
warnings filtered below included. Without a terminal (a log file, a pipe, a CI job) progress is plain lines on
stderr, at most one a bar every LINE_SECONDS, and the libraries' own bars are off.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

QUIET, NORMAL, VERBOSE = -1, 0, 1
# without a terminal: a bar's line at most this often (and one as it starts and ends); the environment variable
# FINETUNE_PROGRESS_SECONDS changes it (0: a line at every update)
LINE_SECONDS = 30.0
_LEVEL_NAMES = {logging.WARNING: "warning: ", logging.ERROR: "error: ", logging.CRITICAL: "error: "}


@dataclass(frozen=True)
class NotApplicable:
    """A third-party warning finetune knows is wrong for its own use, and why."""
    logger: str
    text: str  # a fragment of the message
    why: str


NOT_APPLICABLE = (
    NotApplicable("transformers.utils.import_utils", "requires torchvision (not installed)",
                  "finetune uses no image processor; and following it (pip install torchvision) can replace a CPU "
                  "build of torch with several GB of CUDA packages"),
)
# (diffusers' "No LoRA keys associated to CLIPTextModel" came from its load_lora_weights, which finetune.load_adapter
# no longer calls: it reads LoRA files itself, with each layer's own alpha)


class _DropNotApplicable(logging.Filter):
    def __init__(self, fragments: list[str]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


class _ToolkitFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return _LEVEL_NAMES.get(record.levelno, "") + record.getMessage()


class _ByLevel(logging.Handler):
    """Information to stdout, warnings and errors to stderr; each stream looked up when written (tests and tqdm
    replace them)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must never stop a run
            self.handleError(record)


def configure(verbosity: int = NORMAL) -> None:
    """Set up printing for one command: QUIET, NORMAL or VERBOSE. Safe to call again (tests call main often)."""
    toolkit = logging.getLogger("finetune")
    for handler in [h for h in toolkit.handlers if isinstance(h, _ByLevel)]:
        toolkit.removeHandler(handler)
    handler = _ByLevel()
    handler.setFormatter(_ToolkitFormatter())
    toolkit.addHandler(handler)
    toolkit.setLevel(logging.WARNING if verbosity <= QUIET else logging.DEBUG if verbosity >= VERBOSE
                     else logging.INFO)
    by_logger: dict[str, list[str]] = {}
    for item in NOT_APPLICABLE:
        by_logger.setdefault(item.logger, []).append(item.text)
    for name, fragments in by_logger.items():
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, _DropNotApplicable)]:
            logger.removeFilter(old)
        if verbosity < VERBOSE:
            logger.addFilter(_DropNotApplicable(fragments))
    os.environ["FINETUNE_VERBOSITY"] = str(verbosity)  # read by quiet() in this process and its children
    # the libraries' own default is WARNING; quiet keeps their errors, verbose adds their INFO lines
    level = logging.ERROR if verbosity <= QUIET else logging.INFO if verbosity >= VERBOSE else logging.WARNING
    for library in ("transformers", "diffusers", "accelerate"):
        logging.getLogger(library).setLevel(level)
    _progress_bars(enabled=verbosity > QUIET and _terminal())


def _progress_bars(enabled: bool) -> None:
    """transformers' and diffusers' bars (loading, saving, sampling) have switches of their own, off with --quiet
    and without a terminal (where each redraw would be a line of the log); finetune's own are progress_bar()."""
    import importlib

    for library in ("transformers", "diffusers"):
        if enabled and library not in sys.modules:
            continue  # never switched off in this process
        module = importlib.import_module(f"{library}.utils.logging")
        (module.enable_progress_bar if enabled else module.disable_progress_bar)()


def ensure_configured() -> None:
    """For finetune used from Python (train() in a notebook): print as the command line does, unless the caller
    set up the "finetune" logger already."""
    if not logging.getLogger("finetune").handlers:
        configure(int(os.environ.get("FINETUNE_VERBOSITY", NORMAL)))


def quiet() -> bool:
    """Whether --quiet was given: progress bars stay off."""
    return os.environ.get("FINETUNE_VERBOSITY") == str(QUIET)


def progress_bar(**options):
    """A tqdm bar for finetune's own progress (training steps, cached latents, class images); `options` are
    tqdm's. Off with --quiet. On a terminal it redraws in place; without one it writes plain lines instead (one as
    it starts, at most one every LINE_SECONDS, one as it ends), where tqdm would add a carriage-return redraw to
    the log at every update: megabytes over a long run."""
    from tqdm.auto import tqdm
    from tqdm.notebook import tqdm as widget

    options["disable"] = options.get("disable", False) or quiet()
    if not _terminal() and not issubclass(tqdm, widget):  # a notebook's widget (tqdm.auto there) is left as it is
        seconds = float(os.environ.get("FINETUNE_PROGRESS_SECONDS", LINE_SECONDS))
        # miniters=1: every update may print, mininterval holds it to one a `seconds` (tqdm's monitor thread,
        # which redraws stalled bars every maxinterval, only acts on bars with miniters above 1)
        options.update(file=_Lines(), mininterval=seconds, miniters=1, dynamic_ncols=False)
    return tqdm(**options)


def _terminal() -> bool:
    """Whether stderr (where the bars go) is a terminal."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without it, or closed
        return False


class _Lines:
    """The file a bar writes to without a terminal: each redraw ("\r" and the bar) becomes one line on stderr,
    looked up when written (tests replace it); tqdm's clearing writes (blanks) are dropped, and so is a line equal
    to the one before (a bar's last update and its close both draw 100%)."""

    def __init__(self):
        self.last = None

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line and line != self.last:
            sys.stderr.write(line + "\n")
            self.last = line

    def flush(self) -> None:
        sys.stderr.flush()
