"""Checkpoint files: atomic writes, safe reads (``weights_only``) and the RNG state of exact resume.

A checkpoint holds tensors and plain containers only, so `load_checkpoint` never unpickles
arbitrary objects: a crafted file cannot run code. NumPy arrays travel as tensors
(`encode_arrays`/`decode_arrays`).
"""

from __future__ import annotations

import os
import pickle
import pickletools
import random
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segohem.disk import DiskWriteError, refused_by_disk, refused_write

TEMP_PREFIX = "."
TEMP_SUFFIX = ".tmp"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or unsafe; the message names the file."""


class CheckpointWriteError(DiskWriteError):
    """A checkpoint the disk refused (full, a quota, a file size limit); the previous file is intact."""


def encode_arrays(value: Any) -> Any:
    """A copy of ``value`` with NumPy arrays turned into tensors and NumPy scalars into Python ones."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.array(value, copy=True))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {key: encode_arrays(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(encode_arrays(item) for item in value)
    return value


def decode_arrays(value: Any) -> Any:
    """The inverse of `encode_arrays`: tensors back to (owned) NumPy arrays."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy().copy()
    if isinstance(value, dict):
        return {key: decode_arrays(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(decode_arrays(item) for item in value)
    return value


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states as tensors and plain containers."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    numpy_state = {
        "kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, np.int64)), "position": int(position),
        "has_gauss": int(has_gauss), "cached_gauss": float(cached_gauss),
    }  # fmt: skip
    state: dict[str, Any] = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    saved = state["numpy"]
    keys = saved["keys"].numpy().astype(np.uint32)
    np.random.set_state((saved["kind"], keys, saved["position"], saved["has_gauss"], saved["cached_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash at any moment leaves either the previous checkpoint or the new one, never a torn
    file; a temporary file a kill left behind is removed by `remove_stale_temporaries`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMP_PREFIX}{path.name}.", suffix=TEMP_SUFFIX)
    except OSError as err:
        if refused_by_disk(err):
            raise _write_error(path, err) from err
        raise
    try:
        with os.fdopen(handle, "wb") as tmp:
            torch.save(state, tmp)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException as err:
        written = Path(tmp_name).stat().st_size if Path(tmp_name).exists() else 0
        Path(tmp_name).unlink(missing_ok=True)
        if isinstance(err, (OSError, RuntimeError)) and refused_by_disk(err):
            raise _write_error(path, err, written) from err
        raise


def _write_error(path: Path, err: BaseException, written: int = 0) -> CheckpointWriteError:
    """The error for a checkpoint that could not be written: the file, the cause, the free space."""
    kept = f"the previous {path.name} is unchanged" if path.exists() else f"there was no {path.name} before"
    return refused_write("checkpoint", path, err, kept=kept, written=written, error=CheckpointWriteError)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files of interrupted checkpoint writes in ``folder``; returns them.

    Call only while holding the run folder's lock: another writer's file would look the same.
    """
    stale = [p for p in folder.glob(f"{TEMP_PREFIX}*.pt.*{TEMP_SUFFIX}") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _pickled_globals(path: Path) -> list[str]:
    """The classes and functions a plain pickle file names, read without running it (pickletools)."""
    strings: list[str] = []
    names: list[str] = []
    try:
        for opcode, arg, _ in pickletools.genops(path.read_bytes()):
            if isinstance(arg, str):
                strings.append(arg)
            if opcode.name == "GLOBAL":
                names.append(str(arg).replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
    except (ValueError, EOFError, OSError):
        return names
    return names


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; any failure is one `CheckpointError` naming the file."""
    path = Path(path)
    if path.is_dir():
        hint = " or ".join(str(path / name) for name in ("best.pt", "last.pt") if (path / name).is_file())
        raise CheckpointError(f"{path} is a folder, not a checkpoint" + (f"; pass {hint}" if hint else ""))
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): an interrupted copy? use another checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = re.search(r"Unsupported global: (GLOBAL )?(\S+)", str(err))
        names = [refused.group(2)] if refused else _pickled_globals(path)
        if not names:  # not a pickle at all
            raise CheckpointError(f"checkpoint {path} is truncated or corrupt: it cannot be unpickled") from err
        raise CheckpointError(
            f"checkpoint {path} holds objects that safe loading refuses ({', '.join(names[:3])}): it was written "
            f"by an older segohem (upgrade one you wrote with `segohem upgrade-checkpoint {path} --trusted`) "
            f"or was tampered with; it was not loaded"
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {str(err).splitlines()[0][:200]}") from err
    except (LookupError, TypeError, AttributeError) as err:  # a text file, say: the old unpickler's KeyError(101)
        raise CheckpointError(
            f"checkpoint {path} is not a checkpoint file: torch.load cannot read it ({type(err).__name__})"
        ) from err
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a segohem checkpoint")
    return checkpoint
