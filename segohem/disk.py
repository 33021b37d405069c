"""Writes the disk refuses (a full disk, a quota, a file size limit): one error type, one message.

A run's checkpoints, its dictionary store, its logs' rewrites and its ``config.yaml`` are replaced
atomically (`write_atomically`, or one SQLite transaction), so a refused write leaves the previous
file as it was. The message names the file, says what was kept and how much space is free, and the
command line turns it into exit status 4 (`segohem.cli.main`).
"""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

# what a full disk, a quota or a file size limit raise (OSError.errno)
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# SQLite's codes for the same (a write past a file size limit is a failed write, SQLITE_IOERR_WRITE)
_SQLITE_FULL = frozenset({"SQLITE_FULL", "SQLITE_IOERR_WRITE"})
# how torch.save's zip writer reports a write that stopped short: it gives no errno
_TORCH_SHORT_WRITE = ("unexpected pos", "file write failed", "failed writing file")
ADVICE = "free space or write elsewhere, then run the command again (a training run: with --resume)"


class DiskWriteError(OSError):
    """A file could not be written (no space, a quota, a file size limit); the previous one is intact."""


RefusedError = TypeVar("RefusedError", bound=DiskWriteError)


def refused_by_disk(err: BaseException) -> bool:
    """Whether ``err`` is a write the disk refused: an OSError of `DISK_FULL`, SQLite's full-disk or
    failed-write error, or a write torch.save's zip writer saw stop short."""
    if isinstance(err, OSError):
        return err.errno in DISK_FULL
    if isinstance(err, sqlite3.Error):
        name = getattr(err, "sqlite_errorname", None)  # Python 3.11+
        return name in _SQLITE_FULL if name else "database or disk is full" in str(err)
    return isinstance(err, RuntimeError) and any(mark in str(err) for mark in _TORCH_SHORT_WRITE)


def refused_write(
    what: str,
    path: Path,
    err: BaseException,
    *,
    kept: str,
    written: int | None = None,
    error: type[RefusedError],
) -> RefusedError:
    """The ``error`` (a DiskWriteError) for ``what`` (e.g. "checkpoint") at ``path`` that ``err`` stopped: the file, the
    cause, how much of it was written (when known), the free space in its folder and ``kept``, what is
    still there."""
    folder = path.parent if path.parent.exists() else Path(path.anchor or ".")
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:,.0f} MiB free in {folder}"
    except OSError:
        free = f"free space in {folder} unknown"
    cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if written is not None:
        cause = (f"the write stopped after {written / 2**20:,.1f} MiB" if written else "nothing was written") + (
            f": {cause}"
        )
    return error(f"could not write {what} {path} ({cause}); {free}; {kept}; {ADVICE}")


@contextmanager
def naming(path: Path) -> Iterator[None]:
    """Inside, an OSError that names no file (a failed write() does not) is raised again naming ``path``."""
    try:
        yield
    except OSError as err:
        if err.filename is not None:
            raise
        raise OSError(err.errno, err.strerror, str(path)) from err


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``: a refused
    write or a kill leaves the previous file whole."""
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with naming(path):  # the file, not the temporary
        try:
            with os.fdopen(handle, "wb") as tmp:
                tmp.write(data)
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
