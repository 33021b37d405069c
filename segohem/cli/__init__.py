"""The `segohem` command: the one place that wires data, model, loss, loggers and the engine."""

import os

# Before torch is imported: OpenMP threads that wait passively instead of spinning. On a
# machine whose cores are shared (CI, laptops, a second job), spinning threads made an epoch
# up to 8x slower (38 s against 4.8 s measured with one competing process); passive waits
# cost nothing measurable when the cores are free. An explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from typing import TYPE_CHECKING, Any

from segohem.cli.main import main

if TYPE_CHECKING:
    from segohem.cli.train import run_train

__all__ = ["main", "run_train"]


def __getattr__(name: str) -> Any:
    # run_train imports torch; `segohem --help` (this package's main) must not wait for it
    if name == "run_train":
        from segohem.cli.train import run_train

        return run_train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
