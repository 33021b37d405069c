"""The data error type, and its one-line message even after a DataLoader worker re-raised it."""

from __future__ import annotations

# torch's ExceptionWrapper.reraise rebuilds a worker's exception as
# ``type(f"Caught {name} in DataLoader worker process N.\nOriginal Traceback ...")``.
_WORKER_PREFIX = "Caught "
_TRACEBACK_MARK = "\nOriginal Traceback"


class DatasetError(ValueError):
    """A sample cannot be used; the message names the file and what is wrong with it."""


def dataset_error_message(err: BaseException) -> str:
    """The original message of ``err``, without the worker traceback torch wraps around it.

    A DataLoader with ``num_workers > 0`` re-raises a worker's exception as the same class
    whose message is the whole worker traceback; this returns the last line of that
    traceback's exception text (what the worker raised). Any other exception: ``str(err)``.
    """
    text = str(err)
    if not (text.startswith(_WORKER_PREFIX) and _TRACEBACK_MARK in text):
        return text
    cls = type(err)
    names = [f"{cls.__module__}.{cls.__qualname__}: ", f"{cls.__qualname__}: "]
    for name in names:  # traceback prints module.qualname, or the bare name for builtins
        start = text.rfind("\n" + name)
        if start >= 0:
            return text[start + 1 + len(name) :].strip()
    return text.strip().splitlines()[-1]
