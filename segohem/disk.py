"""Writes the disk refuses (a full disk, a quota, a file size limit): one error type, one message.

Every file a run writes is replaced atomically, so a refused write leaves the previous file as it
was; the message names the file, says what was kept and how much space is free, and the command
line turns it into exit status 4 (`segohem.cli.main`).
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

# what a full disk, a quota or a file size limit raise (OSError.errno)
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class DiskWriteError(OSError):
    """A file could not be written (no space, a quota, a file size limit); the previous one is intact."""


def refused_by_disk(err: BaseException) -> bool:
    """Whether ``err`` is a write the disk refused: an OSError of `DISK_FULL`, or what torch.save
    (its zip writer) and SQLite raise for one."""
    if isinstance(err, OSError):
        return err.errno in DISK_FULL
    text = str(err)
    return any(mark in text for mark in _REFUSED_MARKS)


# torch.save's zip writer ("unexpected pos", "file write failed") and SQLite's own words for a full disk
_REFUSED_MARKS = ("unexpected pos", "write failed", "failed writing", "disk I/O error", "database or disk is full")


def refused_write(what: str, path: Path, err: BaseException, *, kept: str, written: int = 0) -> DiskWriteError:
    """The error for ``what`` (e.g. "checkpoint") at ``path`` that ``err`` stopped: the file, the cause,
    how much of it was written, the free space in its folder and ``kept``, what is still there."""
    folder = path.parent if path.parent.exists() else Path(path.anchor or ".")
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:,.0f} MiB free in {folder}"
    except OSError:
        free = f"free space in {folder} unknown"
    stopped = f"the write stopped after {written / 2**20:,.1f} MiB" if written else "nothing was written"
    cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return DiskWriteError(
        f"could not write {what} {path}: {stopped} ({cause}); {free}; {kept}. "
        "Free space or choose another run.output_dir, then continue with --resume"
    )
