"""The `segohem` command: the one place that wires data, model, loss, loggers and the engine."""

from segohem.cli.main import main
from segohem.cli.train import run_train

__all__ = ["main", "run_train"]
