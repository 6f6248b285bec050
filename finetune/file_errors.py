"""One place that turns a failure to read or write a file into a message a user can act on.

The libraries report the same few problems in their own ways: a full disk is `OSError(ENOSPC)` from Python,
`SafetensorError("... No space left on device (os error 28)")` from safetensors, and a `RuntimeError` from
torch.save (whose own `OSError` is only in its context when torch writes through a Python file object, see
finetune/io/pickle_files.py); a file cut short is a `SafetensorError` ("incomplete metadata, file not fully
covered"), or from torch.load a `RuntimeError` ("failed finding central directory"), `OSError(EINVAL)`, an
`EOFError` or an `UnpicklingError`. `reading` and `writing` wrap every reader and writer of model files, caches
and checkpoints and raise `FileProblem` (exit code 2 on the command line) naming the path, what is wrong and
what to do; anything they do not recognise passes through unchanged.
"""
from __future__ import annotations

import errno
import os
import pickle
import re
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from safetensors import SafetensorError

# a write that fails for want of room: a full disk, or a full quota
NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# a write the file system refuses: a read-only mount, or permissions
NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}
_RUST_ERRNO = re.compile(r"\(os error (\d+)\)")
CUT_SHORT = "is cut short or damaged"


class FileProblem(ValueError):
    """A file or folder that cannot be read or written; the message names it, says what is wrong and the fix."""

    def __init__(self, message: str, path: str | os.PathLike | None = None, errno_: int | None = None):
        super().__init__(message)
        self.path, self.errno = path, errno_


def error_number(exc: BaseException) -> int | None:
    """The operating system's error number behind `exc`, looked for along its chain of causes: an OSError's
    errno, or the `(os error N)` that safetensors' Rust I/O errors end with."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (OSError, FileProblem)) and exc.errno is not None:
            return exc.errno
        if isinstance(exc, SafetensorError):
            found = _RUST_ERRNO.search(str(exc))
            if found:
                return int(found.group(1))
        exc = exc.__cause__ or exc.__context__
    return None


def write_problem(exc: BaseException, path: str | os.PathLike, what: str) -> FileProblem | None:
    """A FileProblem for a write of `what` to `path` that failed with `exc` for want of room or of permission;
    None for anything else (a bug, which should keep its traceback)."""
    number = error_number(exc)
    if number in NO_ROOM:
        return FileProblem(f"no room left on the disk while writing {what} ({path}): {os.strerror(number)}. "
                           "Nothing half-written was left behind. Free some space, or write to a disk with room",
                           path, number)
    if number in NOT_WRITABLE:
        return FileProblem(f"cannot write {what} to {path}: {os.strerror(number)}. Choose a folder you can "
                           "write to, or make this one writable", path, number)
    return None


def unnamed_write_problem(exc: BaseException) -> str | None:
    """The message for a full or read-only disk met where no writer named what it wrote (the command line's
    last resort); None for anything else. EACCES is left alone here: it may have been a read."""
    number = error_number(exc)
    if number not in NO_ROOM | {errno.EROFS}:
        return None
    path = getattr(exc, "filename", None)
    return (f"{os.strerror(number)} while writing {path or 'a file'}. Free some space or choose a disk you "
            "can write to (output_dir=PATH, $FINETUNE_CACHE), then run the command again")


@contextmanager
def writing(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Within: a failed write for want of room or permission raises FileProblem naming `path` and `what` (also
    over an inner writer's FileProblem: a checkpoint is named by its folder, not by its temporary file)."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError, FileProblem) as exc:
        problem = write_problem(exc, path, what)
        if problem is None:
            raise
        raise problem from None


def read_problem(exc: BaseException, path: str | os.PathLike, what: str, fix: str) -> FileProblem | None:
    """A FileProblem for a read of `what` at `path` that failed with `exc` because the file is missing,
    unreadable, cut short or damaged; None for anything else."""
    number = error_number(exc)
    if isinstance(exc, FileNotFoundError) or number == errno.ENOENT:
        return FileProblem(f"{what} {path} does not exist; check the path", path, number)
    if number in NOT_WRITABLE:
        return FileProblem(f"cannot read {what} {path}: {os.strerror(number)}; make it readable", path, number)
    text = str(exc)
    # a pickle refused as unsafe is whole ("Weights only load failed" without a sign of its end missing)
    refused = "Weights only load failed" in text and re.search(r"truncated|EOF|ran out of input", text) is None
    damaged = isinstance(exc, (SafetensorError, EOFError, zipfile.BadZipFile)) or number == errno.EINVAL or (
        isinstance(exc, pickle.UnpicklingError) and not refused) or (
        isinstance(exc, RuntimeError) and re.search(r"PytorchStreamReader|zip archive|central directory",
                                                    text) is not None)
    if not damaged:
        return None
    size = os.path.getsize(path) if os.path.isfile(path) else 0
    return FileProblem(f"{what} {path} {CUT_SHORT} ({size} bytes; {_first_line(exc)}): {fix}", path, number)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


@contextmanager
def reading(path: str | os.PathLike, what: str, fix: str = "download or copy it again") -> Iterator[None]:
    """Within: a failed read of a missing, unreadable, truncated or damaged file raises FileProblem naming
    `path` and `what` and saying `fix`."""
    try:
        yield
    except FileProblem:
        raise
    except (OSError, RuntimeError, SafetensorError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        problem = read_problem(exc, path, what, fix)
        if problem is None:
            raise
        raise problem from None


def nearest_existing(folder: Path) -> Path:
    """`folder`, or its nearest parent that exists (where a mkdir of `folder` would start)."""
    return next((p for p in [folder, *folder.parents] if p.exists()), folder)


def can_write_in(folder: Path) -> bool:
    """Try it: permission bits say nothing of read-only mounts, and nothing at all to root."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def unwritable_folder(folder: str | os.PathLike) -> Path | None:
    """The existing folder at or above `folder` that cannot be written, so `folder` cannot be made or filled
    there; None when it can (or when it is a file: its own check says so)."""
    existing = nearest_existing(Path(os.path.expanduser(folder)))
    if existing.is_dir() and not can_write_in(existing):
        return existing
    return None
