"""The logger protocol the engine talks to, and the local loggers that always run.

Step metrics go to ``metrics.jsonl``; epoch metrics to ``epochs.jsonl`` and ``epochs.csv``.
Optional integrations (W&B) implement the same protocol in their own module.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path
from typing import Any, Protocol

import cv2

from segohem.data.build import ClassInfo
from segohem.disk import naming, write_atomically
from segohem.visualize import EpochVisuals, confusion_image, render_panel, write_png


class Logger(Protocol):
    def log_config(self, config: dict[str, Any]) -> None: ...
    def log_step(self, metrics: dict[str, float], *, step: int) -> None: ...
    def log_epoch(self, metrics: dict[str, float], *, epoch: int, step: int) -> None: ...
    def log_visuals(self, visuals: EpochVisuals, *, epoch: int, step: int) -> None: ...
    def log_artifact(self, path: Path, *, kind: str, aliases: list[str]) -> None: ...
    def log_plots(self, paths: dict[str, Path]) -> None: ...
    def close(self) -> None: ...


class NullLogger:
    """Logs nothing: for non-main ranks and for tests that do not look."""

    def log_config(self, config: dict[str, Any]) -> None:
        pass

    def log_step(self, metrics: dict[str, float], *, step: int) -> None:
        pass

    def log_epoch(self, metrics: dict[str, float], *, epoch: int, step: int) -> None:
        pass

    def log_visuals(self, visuals: EpochVisuals, *, epoch: int, step: int) -> None:
        pass

    def log_artifact(self, path: Path, *, kind: str, aliases: list[str]) -> None:
        pass

    def log_plots(self, paths: dict[str, Path]) -> None:
        pass

    def close(self) -> None:
        pass


def _json_safe(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


class LocalLogger(NullLogger):
    """JSON lines and CSV in the run folder; validation pictures as PNGs under ``viz/``.

    ``resume_step``/``resume_epoch``: records logged after the checkpoint being resumed are
    dropped, so a resumed run's files read as if it had never been interrupted.
    """

    def __init__(
        self, run_dir: str | Path, *, resume_step: int = 0, resume_epoch: int = 0, classes: ClassInfo | None = None
    ) -> None:
        self.run_dir, self.classes = Path(run_dir), classes
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.step_path = self.run_dir / "metrics.jsonl"
        self.epoch_path = self.run_dir / "epochs.jsonl"
        self._truncate(self.step_path, "step", resume_step)
        self._truncate(self.epoch_path, "epoch", resume_epoch)

    @staticmethod
    def _truncate(path: Path, key: str, last_kept: int) -> None:
        if not path.exists():
            return
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        records = []
        for number, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                if number < len(lines):  # only the last line can be cut short (a kill, a full disk)
                    raise ValueError(f"{path}, line {number}: not a JSON record ({err})") from err
                warnings.warn(f"{path}: dropped its last line, cut short by an interrupted write", stacklevel=2)
        kept = [r for r in records if r.get(key, 0) <= last_kept]
        write_atomically(path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def _append(self, path: Path, record: dict[str, Any]) -> None:
        with naming(path), path.open("a") as handle:
            handle.write(json.dumps({k: _json_safe(v) for k, v in record.items()}) + "\n")

    def log_step(self, metrics: dict[str, float], *, step: int) -> None:
        self._append(self.step_path, {"step": step, **metrics})

    def log_epoch(self, metrics: dict[str, float], *, epoch: int, step: int) -> None:
        self._append(self.epoch_path, {"epoch": epoch, "step": step, **metrics})
        records = [json.loads(line) for line in self.epoch_path.read_text().splitlines() if line.strip()]
        columns = list(dict.fromkeys(key for record in records for key in record))
        with (self.run_dir / "epochs.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(records)

    def log_visuals(self, visuals: EpochVisuals, *, epoch: int, step: int) -> None:
        if self.classes is None:
            return
        if not visuals.panels and visuals.confusion is None:
            return
        folder = self.run_dir / "viz" / f"epoch{epoch:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        names, palette, ignore = self.classes.names, self.classes.palette, self.classes.ignore_index
        for panel in visuals.panels:
            picture = render_panel(panel, names=names, palette=palette, ignore_index=ignore)
            write_png(folder / f"{panel.sample_id}.png", cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
        if visuals.confusion is not None:
            picture = confusion_image(visuals.confusion, names)
            write_png(folder / "confusion.png", cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))


class MultiLogger:
    """Fans every call out to several loggers."""

    def __init__(self, *loggers: Logger) -> None:
        self.loggers = loggers

    def log_config(self, config: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.log_config(config)

    def log_step(self, metrics: dict[str, float], *, step: int) -> None:
        for logger in self.loggers:
            logger.log_step(metrics, step=step)

    def log_epoch(self, metrics: dict[str, float], *, epoch: int, step: int) -> None:
        for logger in self.loggers:
            logger.log_epoch(metrics, epoch=epoch, step=step)

    def log_visuals(self, visuals: EpochVisuals, *, epoch: int, step: int) -> None:
        for logger in self.loggers:
            logger.log_visuals(visuals, epoch=epoch, step=step)

    def log_artifact(self, path: Path, *, kind: str, aliases: list[str]) -> None:
        for logger in self.loggers:
            logger.log_artifact(path, kind=kind, aliases=aliases)

    def log_plots(self, paths: dict[str, Path]) -> None:
        for logger in self.loggers:
            logger.log_plots(paths)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
