"""`segohem upgrade-checkpoint`: rewrite a format-1 checkpoint (pickled NumPy state) as format 2.

Format 1 can only be read by unpickling arbitrary objects, so this is the one place that does
it, and only for a file the user declares trusted; the result loads with ``weights_only=True``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from segohem.bank import HardPixelBank
from segohem.engine.checkpoint import CheckpointError, encode_arrays, save_checkpoint
from segohem.engine.run import CHECKPOINT_FORMAT, Progress


def _rng_state(old: dict[str, Any]) -> dict[str, Any]:
    kind, keys, position, has_gauss, cached_gauss = old["numpy"]
    state: dict[str, Any] = {
        "python": old["python"], "torch": old["torch"],
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gauss": float(cached_gauss)},
    }  # fmt: skip
    if "cuda" in old:
        state["cuda"] = old["cuda"]
    return state


def _bank_state(old: dict[str, Any] | None) -> dict[str, Any] | None:
    if not old:
        return None
    bank = HardPixelBank(old["num_classes"])
    bank.load_state_dict(old)  # takes the dense confusions of format 1
    return encode_arrays(bank.state_dict())


def upgrade_checkpoint(source: Path, *, output: Path | None, trusted: bool) -> Path:
    """Write ``source`` (format 1) as format 2 to ``output`` (default ``<stem>.v2.pt`` beside it)."""
    if not trusted:
        raise CheckpointError(
            f"reading {source} means unpickling arbitrary objects, which can run code: pass --trusted "
            f"only for a checkpoint you wrote yourself"
        )
    if not source.is_file():
        raise CheckpointError(f"no checkpoint at {source}")
    try:
        old = torch.load(source, map_location="cpu", weights_only=False)  # trusted by the caller
    except Exception as err:
        raise CheckpointError(f"checkpoint {source} cannot be read: {str(err).splitlines()[0][:200]}") from err
    if not isinstance(old, dict) or old.get("format") == CHECKPOINT_FORMAT:
        raise CheckpointError(f"{source} is not a format-1 segohem checkpoint (nothing to upgrade)")
    if "train_state" not in old:
        raise CheckpointError(f"{source} holds no train_state: not a segohem checkpoint")
    known = {name for name in Progress.__dataclass_fields__}
    upgraded = {
        "format": CHECKPOINT_FORMAT, "model": old["model"], "optimizer": old["optimizer"],
        "scheduler": old["scheduler"], "scaler": old["scaler"],
        "progress": {k: v for k, v in old["train_state"].items() if k in known},
        "rng": _rng_state(old["rng"]), "config": old["config"], "class_names": list(old["class_names"]),
        "metrics": encode_arrays(old.get("metrics") or {}), "bank": _bank_state(old.get("bank")),
    }  # fmt: skip
    output = output or source.with_name(f"{source.stem}.v2.pt")
    save_checkpoint(upgraded, output)
    print(f"wrote {output} (format {CHECKPOINT_FORMAT}); it loads without unpickling code")
    return output
