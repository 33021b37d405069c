"""SQLite storage of the hard-pixel bank: crash-safe, queryable, readable with pandas.

Schema (version 1); arrays are zlib-compressed blobs, everything else plain columns:

    meta(key TEXT PRIMARY KEY, value TEXT)            schema_version, class_names (JSON),
                                                      num_classes, cell_size, momentum, epoch
    samples(sample_id TEXT PRIMARY KEY, height, width, seen, ema_kept_fraction, ema_hard_loss,
            score, hard_pixels, last_epoch, grid_h, grid_w,
            hard_acc BLOB, seen_acc BLOB)             float16 (grid_h, grid_w) decayed sums
    sample_confusion(sample_id, true_class, pred_class, pixels)   non-zero hard-pixel counts
    epoch_classes(epoch, class_id, class_name, hard_pixels, valid_pixels, hard_fraction)
    mined(sample_id TEXT PRIMARY KEY, height, width, kept_fraction, mean_hard_loss,
          hard_mask BLOB,                             np.packbits of the (H, W) bool mask
          loss_map BLOB)                              uint8 round(log1p(loss) * 32), (H, W)

    pandas.read_sql("SELECT * FROM samples ORDER BY score DESC", sqlite3.connect(path))

Each save is one transaction: a kill at any moment leaves the previous state readable.
"""

from __future__ import annotations

import json
import sqlite3
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from segohem.bank import EpochClassStats, HardPixelBank, SampleStats

SCHEMA_VERSION = 1
LOSS_SCALE = 32.0  # loss map quantization: uint8 = round(log1p(loss) * LOSS_SCALE), loss up to ~2900
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS samples(
    sample_id TEXT PRIMARY KEY, height INTEGER, width INTEGER, seen INTEGER, ema_kept_fraction REAL,
    ema_hard_loss REAL, score REAL, hard_pixels INTEGER, last_epoch INTEGER, grid_h INTEGER, grid_w INTEGER,
    hard_acc BLOB, seen_acc BLOB);
CREATE TABLE IF NOT EXISTS sample_confusion(
    sample_id TEXT, true_class INTEGER, pred_class INTEGER, pixels INTEGER,
    PRIMARY KEY(sample_id, true_class, pred_class));
CREATE TABLE IF NOT EXISTS epoch_classes(
    epoch INTEGER, class_id INTEGER, class_name TEXT, hard_pixels INTEGER, valid_pixels INTEGER,
    hard_fraction REAL, PRIMARY KEY(epoch, class_id));
CREATE TABLE IF NOT EXISTS mined(
    sample_id TEXT PRIMARY KEY, height INTEGER, width INTEGER, kept_fraction REAL, mean_hard_loss REAL,
    hard_mask BLOB, loss_map BLOB);
"""


@contextmanager
def connect(path: str | Path) -> Iterator[sqlite3.Connection]:
    """A connection whose ``with`` block is one transaction (committed or rolled back whole)."""
    connection = sqlite3.connect(str(path))
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        connection.executescript(SCHEMA)
        with connection:
            yield connection
    finally:
        connection.close()


def pack_array(array: np.ndarray, dtype: str = "float16") -> bytes:
    return zlib.compress(np.ascontiguousarray(array, dtype=dtype).tobytes(), 6)


def unpack_array(blob: bytes, shape: tuple[int, int], dtype: str = "float16") -> np.ndarray:
    return np.frombuffer(zlib.decompress(blob), dtype=dtype).reshape(shape).astype(np.float32)


def save_bank(bank: HardPixelBank, path: str | Path, *, class_names: list[str] | tuple[str, ...], epoch: int) -> None:
    """Replace the bank tables in ``path`` by ``bank``'s state, atomically (mined masks are kept)."""
    sample_rows, confusion_rows = [], []
    for sample_id, s in bank.samples.items():
        sample_rows.append((
            sample_id, s.height, s.width, s.seen, s.ema_kept_fraction, s.ema_hard_loss, s.score,
            int(s.confusion.sum()), s.last_epoch, *s.hard_acc.shape, pack_array(s.hard_acc), pack_array(s.seen_acc),
        ))  # fmt: skip
        true_ids, pred_ids = np.nonzero(s.confusion)
        confusion_rows += [
            (sample_id, int(t), int(p), int(s.confusion[t, p])) for t, p in zip(true_ids, pred_ids, strict=True)
        ]
    epoch_rows = [
        (e, c, class_names[c], int(h.hard[c]), int(h.valid[c]), float(h.hard[c]) / max(1, int(h.valid[c])))
        for e, h in sorted(bank.epochs.items())
        for c in range(bank.num_classes)
    ]
    meta = {
        "schema_version": SCHEMA_VERSION, "class_names": json.dumps(list(class_names)),
        "num_classes": bank.num_classes, "cell_size": bank.cell_size, "momentum": bank.momentum, "epoch": epoch,
    }  # fmt: skip
    with connect(path) as db:
        for table in ("samples", "sample_confusion", "epoch_classes"):
            db.execute(f"DELETE FROM {table}")
        db.executemany("INSERT INTO samples VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", sample_rows)
        db.executemany("INSERT INTO sample_confusion VALUES (?,?,?,?)", confusion_rows)
        db.executemany("INSERT INTO epoch_classes VALUES (?,?,?,?,?,?)", epoch_rows)
        db.executemany("INSERT OR REPLACE INTO meta VALUES (?,?)", [(k, str(v)) for k, v in meta.items()])


def read_meta(path: str | Path) -> dict[str, Any]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"no hard-pixel store at {path}")
    with connect(path) as db:
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    if not meta:
        raise FileNotFoundError(f"{path} holds no saved hard-pixel bank yet")
    meta["class_names"] = json.loads(meta["class_names"])
    return meta


def load_bank(path: str | Path) -> HardPixelBank:
    """Rebuild a bank (float16 precision maps) from a store written by `save_bank`."""
    meta = read_meta(path)
    num_classes = int(meta["num_classes"])
    bank = HardPixelBank(num_classes, cell_size=int(meta["cell_size"]), momentum=float(meta["momentum"]))
    with connect(path) as db:
        for row in db.execute("SELECT sample_id, height, width, seen, ema_kept_fraction, ema_hard_loss, "
                              "last_epoch, grid_h, grid_w, hard_acc, seen_acc FROM samples"):  # fmt: skip
            sample_id, height, width, seen, kept, loss, last_epoch, grid_h, grid_w, hard_blob, seen_blob = row
            bank.samples[sample_id] = SampleStats(
                height=height, width=width, seen=seen, ema_kept_fraction=kept, ema_hard_loss=loss,
                last_epoch=last_epoch, hard_acc=unpack_array(hard_blob, (grid_h, grid_w)),
                seen_acc=unpack_array(seen_blob, (grid_h, grid_w)),
                confusion=np.zeros((num_classes, num_classes), np.int64),
            )  # fmt: skip
        for sample_id, true_class, pred_class, pixels in db.execute("SELECT * FROM sample_confusion"):
            bank.samples[sample_id].confusion[true_class, pred_class] = pixels
        for epoch, class_id, _, hard, valid, _ in db.execute("SELECT * FROM epoch_classes"):
            stats = bank.epochs.setdefault(
                epoch, EpochClassStats(np.zeros(num_classes, np.int64), np.zeros(num_classes, np.int64))
            )
            stats.hard[class_id], stats.valid[class_id] = hard, valid
    return bank


def save_mined(path: str | Path, rows: list[tuple[str, np.ndarray, np.ndarray]]) -> None:
    """Store exact full-resolution hard masks and loss maps: rows of (sample_id, hard_mask, pixel_loss)."""
    records = []
    for sample_id, hard_mask, pixel_loss in rows:
        kept = int(hard_mask.sum())
        quantized = np.clip(np.rint(np.log1p(np.maximum(pixel_loss, 0)) * LOSS_SCALE), 0, 255).astype(np.uint8)
        records.append((
            sample_id, *hard_mask.shape, kept / hard_mask.size, float(pixel_loss[hard_mask].mean()) if kept else 0.0,
            zlib.compress(np.packbits(hard_mask).tobytes(), 6), zlib.compress(quantized.tobytes(), 6),
        ))  # fmt: skip
    with connect(path) as db:
        db.executemany("INSERT OR REPLACE INTO mined VALUES (?,?,?,?,?,?,?)", records)


def load_mined(path: str | Path, sample_id: str) -> tuple[np.ndarray, np.ndarray]:
    """(hard_mask (H, W) bool, pixel_loss (H, W) float32, dequantized) of one mined sample."""
    with connect(path) as db:
        row = db.execute(
            "SELECT height, width, hard_mask, loss_map FROM mined WHERE sample_id=?", (sample_id,)
        ).fetchone()
    if row is None:
        raise KeyError(f"sample {sample_id!r} was not mined into {path}")
    height, width, mask_blob, loss_blob = row
    mask = np.unpackbits(np.frombuffer(zlib.decompress(mask_blob), np.uint8))[: height * width]
    quantized = np.frombuffer(zlib.decompress(loss_blob), np.uint8).reshape(height, width)
    return mask.reshape(height, width).astype(bool), np.expm1(quantized.astype(np.float32) / LOSS_SCALE)
