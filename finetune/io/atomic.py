"""Writing a file or a folder so that a reader sees the old one or the whole new one, never half.

Every atomic write in finetune goes through `atomic_file` or `atomic_dir`, so there is one naming rule for what a
killed run can leave behind: `.NAME.tmp-PID` beside the target while it is written (the process id keeps two
processes that write the same shared cache entry apart), and `.NAME.old-PID` for a folder moved aside while its
replacement takes its name. `stale_temporaries` finds them; finetune.training.checkpoint removes them on resume.
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

WRITING = "tmp"  # the temporary a file or folder is written to
MOVED_ASIDE = "old"  # an earlier folder, while its replacement takes its name


def temporary_path(path: str | os.PathLike, role: str = WRITING) -> Path:
    """The one name a temporary beside `path` takes: `.NAME.ROLE-PID`, hidden and in the same folder (a rename
    is only atomic within one file system)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{role}-{os.getpid()}")


@contextmanager
def atomic_file(path: str | os.PathLike, *, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path` (its folder created) for the block to write. When the block ends
    without an exception the temporary takes `path`'s name (os.replace); when it raises, the temporary is removed
    and `path` stays as it was. `durable`: fsync the file before the rename and the folder after, so the new file
    and its name survive a power cut, not only a killed process."""
    path = Path(path)
    tmp = temporary_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
        if durable:
            _fsync_file(tmp)
        os.replace(tmp, path)
        if durable:
            _fsync_directory(path.parent)
    finally:
        tmp.unlink(missing_ok=True)  # there only when the block or the rename failed


@contextmanager
def atomic_dir(path: str | os.PathLike, *, durable: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path` for the block to fill. When the block ends without an
    exception the folder takes `path`'s name: an earlier folder there is moved aside (`.NAME.old-PID`) until the
    new one is in place, then removed. When the block raises, the temporary folder is removed and `path` stays as
    it was. `durable`: fsync every file in it before the swap and the parent folder after."""
    path = Path(path)
    tmp, aside = temporary_path(path), temporary_path(path, MOVED_ASIDE)
    shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier process that had this id (ids are reused)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        if durable:
            for item in tmp.rglob("*"):
                if item.is_file():
                    _fsync_file(item)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed save (full disk, Ctrl-C) leaves nothing half-written
        raise
    shutil.rmtree(aside, ignore_errors=True)
    if path.exists():
        path.rename(aside)  # a folder cannot be replaced while it holds files: move it aside first
    os.replace(tmp, path)
    if durable:
        _fsync_directory(path.parent)
    shutil.rmtree(aside, ignore_errors=True)


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` through atomic_file: a reader sees the old file or the new, never half. A full or
    read-only disk raises finetune.file_errors.FileProblem naming `path` (not the temporary name)."""
    from finetune.file_errors import writing  # imported here: it imports safetensors, this module nothing

    path = Path(path)
    # reports and records, rewritten often and cheap to write again: not worth an fsync each (nor were they)
    with writing(path, path.name), atomic_file(path, durable=False) as tmp:
        tmp.write_text(text)
    return path


def stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """The temporaries in `folder` that atomic_file and atomic_dir leave only when their process was killed
    midway. A folder moved aside counts only once the folder it made room for is back: until then it is the only
    copy of the earlier one."""
    folder = Path(folder)
    stale = sorted(folder.glob(f".*.{WRITING}-*"))
    for aside in sorted(folder.glob(f".*.{MOVED_ASIDE}-*")):
        target = folder / aside.name[1:aside.name.rindex(f".{MOVED_ASIDE}-")]
        if target.exists():
            stale.append(aside)
    return stale


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_directory(path: Path) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
