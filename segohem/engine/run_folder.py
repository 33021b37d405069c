"""One writer per run folder: an advisory lock that names the process holding it."""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".lock"


class RunFolderBusy(RuntimeError):
    """Another process is writing the run folder."""


@contextmanager
def lock_run_folder(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``run_dir/.lock`` while the block runs.

    The kernel releases the lock when the process dies (even by kill -9), so a crashed run
    never leaves the folder locked; the file's text only names the holder for the message.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = (run_dir / LOCK_FILE).open("a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise RunFolderBusy(
                f"run folder {run_dir} is in use by {holder}; wait for it to finish or pick another run.name=..."
            ) from None
        handle.seek(0)
        handle.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        handle.write(f"process {os.getpid()} on {socket.gethostname()} (since {started})\n")
        handle.flush()
        yield
    finally:
        handle.close()  # closing releases the lock
