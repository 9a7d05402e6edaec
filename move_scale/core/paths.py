"""Where a command reads and writes: checked before any work; results never lost when writing
fails at the end.

    check_output_file(args.out, "--out")     # before the work: an OutputError names the problem
    ...                                      # hours of work
    saved = save_or_keep(lambda p: save_mae(mae, p), args.out, "--out")   # the result, somewhere

A check walks up to the nearest existing folder: it must be a folder this process may write into,
and the target itself must not be a folder (for a file) or a file (for a folder). Nothing is
created by a check. URLs (s3://...) are left to the storage layer.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

from move_scale.core.errors import UserError

log = logging.getLogger(__name__)


class OutputError(UserError, OSError):
    """An output path that cannot be written; the message names the option and the path.
    `saved_at`: where the result went instead (save_or_keep), or None."""

    saved_at: Path | None = None


class InputError(UserError, FileNotFoundError):
    """An input path that does not exist; the message names the option and the path."""


def check_input(path: str | Path, what: str, *, kind: str = "file or folder") -> Path:
    """`path` exists (URLs are left to the storage layer)."""
    if _is_url(path):
        return Path(path)
    found = Path(path).expanduser()
    if not found.exists():
        raise InputError(f"{what} {path}: no such {kind}")
    return found


def _is_url(path: str | Path) -> bool:
    return "://" in str(path)


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def _check_parent(path: Path, what: str) -> None:
    existing = _nearest_existing(path.parent if path.parent != path else path)
    if not existing.is_dir():
        raise OutputError(f"{what} {path}: {existing} is a file, so nothing can be written under "
                          f"it; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {path}: no permission to write in {existing}; choose another path")


def check_output_file(path: str | Path, what: str, example: str = "out") -> Path:
    """The file `path` can be created or replaced (its folders may not exist yet); `example`: a
    file name to suggest when `path` is a folder."""
    if _is_url(path):
        return Path(path)
    path = Path(path).expanduser()
    if not str(path).strip() or path.is_dir():
        raise OutputError(f"{what} {path} is a folder; give the path of a file, e.g. {path / example}")
    _check_parent(path, what)
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{what} {path} exists and is not writable; choose another path")
    return path


def check_output_dir(path: str | Path, what: str) -> Path:
    """The folder `path` exists or can be created, and files can be written into it."""
    if _is_url(path):
        return Path(path)
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} is a file, not a folder; give a folder path")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputError(f"{what} {path}: no permission to write in it; choose another folder")
        return path
    _check_parent(path, what)
    return path


def fallback_path(path: str | Path) -> Path:
    """A path in the system's temporary folder for what could not be written to `path`."""
    path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(tempfile.gettempdir()) / f"{path.stem or 'output'}-{stamp}-{os.getpid()}{path.suffix}"


def save_or_keep(write: Callable[[Path], object], path: str | Path, what: str) -> Path:
    """`write(path)`; when that fails with an OSError, `write` to a temporary path instead and
    raise an OutputError that says where the result went. When that fails too, the error says so
    and the caller must print what it has."""
    path = Path(path)
    try:
        write(path)
        return path
    except OSError as err:
        first = err
    other = fallback_path(path)
    try:
        write(other)
    except OSError as err:
        raise OutputError(f"could not write {what} to {path} ({first}) nor to {other} ({err})") from err
    error = OutputError(f"could not write {what} to {path} ({first}); it is saved at {other} instead")
    error.saved_at = other
    raise error
