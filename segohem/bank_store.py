"""SQLite storage of the hard-pixel bank: crash-safe, queryable, readable with pandas.

Schema (version 1); arrays are zlib-compressed blobs, everything else plain columns:

    meta(key TEXT PRIMARY KEY, value TEXT)            schema_version, class_names (JSON),
                                                      num_classes, cell_size, momentum, epoch,
                                                      multilabel (1: multi-label classes)
    samples(sample_id TEXT PRIMARY KEY, height, width, seen, ema_kept_fraction, ema_hard_loss,
            score, hard_pixels, last_epoch, grid_h, grid_w,
            hard_acc BLOB, seen_acc BLOB)             float16 (grid_h, grid_w) decayed sums
    sample_confusion(sample_id, true_class, pred_class, pixels)   non-zero hard-pixel counts
    sample_decisions(sample_id, class_id, true_present, pred_present, pixels)
                                                      multi-label stores instead: non-zero counts of
                                                      hard (pixel, class) decisions (0 / 1 presence)
    epoch_classes(epoch, class_id, class_name, hard_pixels, valid_pixels, hard_fraction)
    epoch_missed(epoch, class_id, missed_pixels)      hard pixels of the class predicted as another
                                                      (absent from stores written before it was counted)
    mined(sample_id TEXT PRIMARY KEY, height, width, kept_fraction, mean_hard_loss,
          hard_mask BLOB,                             np.packbits of the (H, W) bool mask
          loss_map BLOB)                              uint8 round(log1p(loss) * 32), (H, W)

    pandas.read_sql("SELECT * FROM samples ORDER BY score DESC", sqlite3.connect(path))

Each save is one transaction: a kill at any moment leaves the previous state readable. Readers
open the file read-only and turn every damaged or foreign file into one `StoreError` line.
"""

from __future__ import annotations

import glob
import json
import os
import sqlite3
import tempfile
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np

from segohem.bank import EpochClassStats, HardPixelBank, SampleStats, split_decisions
from segohem.disk import DiskWriteError, refused_by_disk, refused_write

SCHEMA_VERSION = 1
LOSS_SCALE = 32.0  # loss map quantization: uint8 = round(log1p(loss) * LOSS_SCALE), loss up to ~2900
TEMP_PREFIX = ".segohem-partial-"  # a store being rebuilt: <folder>/.segohem-partial-<store name>.<random>
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS samples(
    sample_id TEXT PRIMARY KEY, height INTEGER, width INTEGER, seen INTEGER, ema_kept_fraction REAL,
    ema_hard_loss REAL, score REAL, hard_pixels INTEGER, last_epoch INTEGER, grid_h INTEGER, grid_w INTEGER,
    hard_acc BLOB, seen_acc BLOB);
CREATE TABLE IF NOT EXISTS sample_confusion(
    sample_id TEXT, true_class INTEGER, pred_class INTEGER, pixels INTEGER,
    PRIMARY KEY(sample_id, true_class, pred_class));
CREATE TABLE IF NOT EXISTS sample_decisions(
    sample_id TEXT, class_id INTEGER, true_present INTEGER, pred_present INTEGER, pixels INTEGER,
    PRIMARY KEY(sample_id, class_id, true_present, pred_present));
CREATE TABLE IF NOT EXISTS epoch_classes(
    epoch INTEGER, class_id INTEGER, class_name TEXT, hard_pixels INTEGER, valid_pixels INTEGER,
    hard_fraction REAL, PRIMARY KEY(epoch, class_id));
CREATE TABLE IF NOT EXISTS epoch_missed(
    epoch INTEGER, class_id INTEGER, missed_pixels INTEGER, PRIMARY KEY(epoch, class_id));
CREATE TABLE IF NOT EXISTS mined(
    sample_id TEXT PRIMARY KEY, height INTEGER, width INTEGER, kept_fraction REAL, mean_hard_loss REAL,
    hard_mask BLOB, loss_map BLOB);
"""
REPAIR_HINT = (
    " (a run's hard_pixels.sqlite is rewritten from its checkpoint's bank when training resumes; "
    "`segohem mine` builds a new store)"
)
FOREIGN_HINT = " (pass a store written by `segohem train` or `segohem mine`, or a run folder's hard_pixels.sqlite)"


class StoreError(ValueError):
    """A file that is not a readable hard-pixel store: one line naming the file, what is wrong and what would work.

    ``reason`` is the part without the advice (what `check_store` returns).
    """

    def __init__(self, reason: str, advice: str = "") -> None:
        super().__init__(reason + advice)
        self.reason = reason


def _schema_columns() -> dict[str, list[str]]:
    """Table name -> column names, read off `SCHEMA` itself so that the check cannot drift from it."""
    db = sqlite3.connect(":memory:")
    try:
        db.executescript(SCHEMA)
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY rowid")]
        return {table: [row[1] for row in db.execute(f"PRAGMA table_info({table})")] for table in tables}
    finally:
        db.close()


TABLES = _schema_columns()
# absent from stores written before multi-label banks / missed counts; created on write
OPTIONAL_TABLES = ("sample_decisions", "epoch_missed")


def _header_problem(path: Path) -> str | None:
    """Why the file's first 100 bytes (the SQLite header) rule it out as a complete database, or None."""
    size = path.stat().st_size
    if size == 0:
        return f"{path} is empty (0 bytes)"
    with path.open("rb") as handle:
        header = handle.read(100)
    if len(header) < 100 or not header.startswith(b"SQLite format 3\x00"):
        return f"{path} is not an SQLite database"
    page_size = int.from_bytes(header[16:18], "big")
    expected = int.from_bytes(header[28:32], "big") * (65536 if page_size == 1 else page_size)
    size_is_valid = header[24:28] == header[92:96]  # SQLite trusts the page count only then
    wal = Path(f"{path}-wal")
    pages_in_log = wal.is_file() and wal.stat().st_size > 0  # the log may hold pages the file does not yet
    if size_is_valid and not pages_in_log and size < expected:
        return f"{path} is truncated ({size} bytes; its header says {expected})"
    return None


def _structure_problem(path: Path, db: sqlite3.Connection) -> str | None:
    """Why an SQLite database is not a hard-pixel store of this schema version, or None."""
    present = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    missing = [table for table in TABLES if table not in present and table not in OPTIONAL_TABLES]
    if missing:
        return f"{path} is not a segohem hard-pixel store: it lacks the table(s) {', '.join(missing)}"
    for table, columns in TABLES.items():
        if table not in present:
            continue
        have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if lacking := [column for column in columns if column not in have]:
            return f"{path} is not a segohem hard-pixel store: its {table} table lacks {', '.join(lacking)}"
    row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if row is not None and row[0] != str(SCHEMA_VERSION):
        return f"{path} has schema version {row[0]}; this segohem reads version {SCHEMA_VERSION}"
    return None


def _damaged(path: Path, err: sqlite3.Error) -> str:
    return f"{path} is corrupt ({' '.join(str(err).split())})"


@contextmanager
def open_store(path: str | Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection to the hard-pixel store at ``path``: querying never changes a byte of the file.

    FileNotFoundError if there is no file; StoreError if it is damaged or not a store, checked up front
    from its header and schema, and for any SQLite error the ``with`` block meets (a corrupt page).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no hard-pixel store at {path}")
    if problem := _header_problem(path):
        raise StoreError(problem, REPAIR_HINT)
    # A store in WAL mode needs its -shm file even to be read, and SQLite cannot create it in a folder
    # it may not write to (a colleague's run, a read-only mount): there, with no unmerged -wal content
    # left, the file is read as immutable, which needs no -shm file. Immutable reads take no lock: a
    # query that meets the owner's save in progress may read a mix of two epochs or fail as corrupt,
    # and is right when asked again after the save.
    wal = path.with_name(path.name + "-wal")
    frozen = not os.access(path.parent, os.W_OK) and not (wal.is_file() and wal.stat().st_size > 0)
    try:  # as_uri() percent-quotes '?', '#', '%' and spaces, which would otherwise end or alter the path
        db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro" + ("&immutable=1" if frozen else ""), uri=True)
    except sqlite3.Error as err:
        raise StoreError(f"{path} cannot be opened read-only ({err})", REPAIR_HINT) from err
    try:
        if problem := _structure_problem(path, db):
            raise StoreError(problem, FOREIGN_HINT)
        yield db
    except sqlite3.Error as err:
        raise StoreError(_damaged(path, err), REPAIR_HINT) from err
    finally:
        db.close()


def check_store(path: str | Path) -> str | None:
    """None when ``path`` is a sound hard-pixel store (with or without a saved bank yet), else why not.

    Runs SQLite's full quick_check, so it reads the whole file: meant for resume time and `save_bank`,
    not for every query. The reason is one line and names the file.
    """
    path = Path(path)
    if not path.is_file():
        return f"{path} does not exist"
    try:
        with open_store(path) as db:
            result = db.execute("PRAGMA quick_check(1)").fetchone()[0]
    except StoreError as err:
        return err.reason
    if result != "ok":
        return f"{path} is corrupt (SQLite integrity check: {' '.join(str(result).split())})"
    return None


@contextmanager
def connect(path: str | Path) -> Iterator[sqlite3.Connection]:
    """A writable connection whose ``with`` block is one transaction (committed or rolled back whole).

    Creates the tables in a new or empty file; refuses with StoreError, before writing anything, a file
    that is damaged or holds another schema, and turns a corrupt page met while writing into StoreError.
    """
    path = Path(path)
    if path.is_file() and path.stat().st_size > 0:
        with open_store(path):
            pass
    connection = sqlite3.connect(str(path))
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        connection.executescript(SCHEMA)
        with connection:
            yield connection
    except sqlite3.DatabaseError as err:
        if type(err) is not sqlite3.DatabaseError:  # locked, full disk, I/O: not the file's content
            raise
        raise StoreError(_damaged(path, err), REPAIR_HINT) from err
    finally:
        connection.close()


def pack_array(array: np.ndarray, dtype: str = "float16") -> bytes:
    return zlib.compress(np.ascontiguousarray(array, dtype=dtype).tobytes(), 6)


def unpack_array(blob: bytes, shape: tuple[int, int], dtype: str = "float16") -> np.ndarray:
    return np.frombuffer(zlib.decompress(blob), dtype=dtype).reshape(shape).astype(np.float32)


def _bank_rows(bank: HardPixelBank, *, class_names: list[str] | tuple[str, ...], epoch: int) -> dict[str, list[Any]]:
    """The rows that hold ``bank``: table name -> rows (meta as (key, value) pairs)."""
    sample_rows, confusion_rows, decision_rows = [], [], []
    for sample_id, s in bank.samples.items():
        sample_rows.append((
            sample_id, s.height, s.width, s.seen, s.ema_kept_fraction, s.ema_hard_loss, s.score,
            int(s.confusion_counts.sum()), s.last_epoch, *s.hard_acc.shape, pack_array(s.hard_acc),
            pack_array(s.seen_acc),
        ))  # fmt: skip
        if bank.multilabel:  # flat index (class * 2 + true) * 2 + predicted, see `SampleStats`
            class_ids, true_ids, pred_ids = split_decisions(s.confusion_pairs)
            decision_rows += [
                (sample_id, int(c), int(t), int(p), int(n))
                for c, t, p, n in zip(class_ids, true_ids, pred_ids, s.confusion_counts, strict=True)
            ]
            continue
        true_ids, pred_ids = np.divmod(s.confusion_pairs, bank.num_classes)
        confusion_rows += [
            (sample_id, int(t), int(p), int(n)) for t, p, n in zip(true_ids, pred_ids, s.confusion_counts, strict=True)
        ]
    epoch_rows = [
        (e, c, class_names[c], int(h.hard[c]), int(h.valid[c]), float(h.hard[c]) / max(1, int(h.valid[c])))
        for e, h in sorted(bank.epochs.items())
        for c in range(bank.num_classes)
    ]
    missed_rows = [
        (e, c, int(h.missed[c])) for e, h in sorted(bank.epochs.items()) if h.missed is not None
        for c in range(bank.num_classes)
    ]  # fmt: skip
    meta = {
        "schema_version": SCHEMA_VERSION, "class_names": json.dumps(list(class_names)),
        "num_classes": bank.num_classes, "cell_size": bank.cell_size, "momentum": bank.momentum, "epoch": epoch,
        "multilabel": int(bank.multilabel),
    }  # fmt: skip
    meta_rows = [(k, str(v)) for k, v in meta.items()]
    return {"samples": sample_rows, "sample_confusion": confusion_rows, "sample_decisions": decision_rows,
            "epoch_classes": epoch_rows, "epoch_missed": missed_rows, "meta": meta_rows}  # fmt: skip


def _write_bank(db: sqlite3.Connection, rows: dict[str, list[Any]]) -> None:
    for table in ("samples", "sample_confusion", "sample_decisions", "epoch_classes", "epoch_missed"):
        db.execute(f"DELETE FROM {table}")
    db.executemany("INSERT INTO samples VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", rows["samples"])
    db.executemany("INSERT INTO sample_confusion VALUES (?,?,?,?)", rows["sample_confusion"])
    db.executemany("INSERT INTO sample_decisions VALUES (?,?,?,?,?)", rows["sample_decisions"])
    db.executemany("INSERT INTO epoch_classes VALUES (?,?,?,?,?,?)", rows["epoch_classes"])
    db.executemany("INSERT INTO epoch_missed VALUES (?,?,?)", rows["epoch_missed"])
    db.executemany("INSERT OR REPLACE INTO meta VALUES (?,?)", rows["meta"])


def _rebuild(path: Path, rows: dict[str, list[Any]]) -> None:
    """Write a new store beside ``path`` and rename it over ``path``: a kill leaves the old file or the new."""
    handle, temp_name = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        db = sqlite3.connect(temp_name)
        try:
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(SCHEMA)
            with db:
                _write_bank(db, rows)
        finally:
            db.close()
        for suffix in ("-wal", "-shm", "-journal"):  # the old file's logs: SQLite would replay them into the new one
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        os.replace(temp_name, path)
    finally:
        Path(temp_name).unlink(missing_ok=True)
    with suppress(OSError):  # make the rename itself durable where directories can be synced (POSIX)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def _remove_stale_temps(path: Path) -> None:
    """Delete what a rebuild of ``path`` killed half-way left behind (its temp file and that file's journal)."""
    for leftover in path.parent.glob(glob.escape(f"{TEMP_PREFIX}{path.name}.") + "*"):
        leftover.unlink(missing_ok=True)


def save_bank(bank: HardPixelBank, path: str | Path, *, class_names: list[str] | tuple[str, ...], epoch: int) -> None:
    """Replace the bank tables in ``path`` by ``bank``'s state, atomically (mined masks are kept).

    The store derives from the bank, so saving never fails on the file's content: a missing file is
    created, and a damaged or foreign one is rebuilt from ``bank`` alone with a warning (its mined
    masks are lost). Either way a kill leaves the previous file or the new one, never a mix.
    """
    path = Path(path)
    _remove_stale_temps(path)
    rows = _bank_rows(bank, class_names=class_names, epoch=epoch)
    try:
        problem = check_store(path)
        if problem is None:
            try:
                with connect(path) as db:
                    _write_bank(db, rows)
                return
            except StoreError as err:  # a corrupt page that quick_check did not reach
                problem = err.reason
        if path.exists():
            warnings.warn(f"{problem}; rebuilding it from the hard-pixel bank in memory", stacklevel=2)
        _rebuild(path, rows)
    except (sqlite3.OperationalError, OSError) as err:
        _remove_stale_temps(path)
        if refused_by_disk(err):
            kept = "the store is as its last save left it (one transaction)" if path.exists() else "no store was kept"
            raise refused_write("hard-pixel store", path, err, kept=kept, error=StoreWriteError) from err
        if isinstance(err, sqlite3.OperationalError) and "unable to open" in str(err):
            raise StoreError(f"cannot write {path} ({err}): is its folder writable?") from err
        raise


class StoreWriteError(DiskWriteError):
    """The hard-pixel store could not be written (a full disk); its last save is intact."""


@contextmanager
def _decoding(path: Path) -> Iterator[None]:
    """Turn a malformed value inside a well-formed database (a bad blob, a dangling id) into StoreError."""
    try:
        yield
    except StoreError:
        raise
    except (zlib.error, ValueError, KeyError, IndexError, TypeError) as err:
        raise StoreError(f"{path} holds malformed data ({type(err).__name__}: {err})", REPAIR_HINT) from err


def read_meta(path: str | Path) -> dict[str, Any]:
    """The store's meta table: schema_version, class_names (a list), num_classes, cell_size, momentum, epoch,
    multilabel (a bool; False in stores written before multi-label banks)."""
    with open_store(path) as db:
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    if not meta:
        raise StoreError(f"{path} holds no saved hard-pixel bank yet (only mined masks, if anything)")
    with _decoding(Path(path)):
        meta["class_names"] = json.loads(meta["class_names"])
    meta["multilabel"] = meta.get("multilabel", "0") == "1"
    return meta


def load_bank(path: str | Path) -> HardPixelBank:
    """Rebuild a bank (float16 precision maps) from a store written by `save_bank`."""
    meta = read_meta(path)
    with open_store(path) as db, _decoding(Path(path)):
        num_classes, multilabel = int(meta["num_classes"]), meta["multilabel"]
        bank = HardPixelBank(num_classes, cell_size=int(meta["cell_size"]), momentum=float(meta["momentum"]),
                             multilabel=multilabel)  # fmt: skip
        for row in db.execute("SELECT sample_id, height, width, seen, ema_kept_fraction, ema_hard_loss, "
                              "last_epoch, grid_h, grid_w, hard_acc, seen_acc FROM samples"):  # fmt: skip
            sample_id, height, width, seen, kept, loss, last_epoch, grid_h, grid_w, hard_blob, seen_blob = row
            bank.samples[sample_id] = SampleStats(
                height=height, width=width, seen=seen, ema_kept_fraction=kept, ema_hard_loss=loss,
                last_epoch=last_epoch, hard_acc=unpack_array(hard_blob, (grid_h, grid_w)),
                seen_acc=unpack_array(seen_blob, (grid_h, grid_w)),
                num_classes=num_classes, confusion_pairs=np.zeros(0, np.int32),
                confusion_counts=np.zeros(0, np.int64), multilabel=multilabel,
            )  # fmt: skip
        read = _read_decisions if multilabel else _read_confusions
        for sample_id, entries in read(db, num_classes).items():
            sample = bank.samples[sample_id]
            sample.confusion_pairs = np.array([pair for pair, _ in entries], np.int32)
            sample.confusion_counts = np.array([pixels for _, pixels in entries], np.int64)
        for epoch, class_id, _, hard, valid, _ in db.execute("SELECT * FROM epoch_classes"):
            stats = bank.epochs.setdefault(epoch, EpochClassStats.empty(num_classes))
            stats.hard[class_id], stats.valid[class_id] = hard, valid
        # epochs without missed rows were not counted (stores written before misses were)
        counted: dict[int, list[tuple[int, int]]] = {epoch: [] for epoch in bank.epochs}
        if has_table(db, "epoch_missed"):
            for epoch, class_id, missed in db.execute("SELECT * FROM epoch_missed"):
                counted.setdefault(epoch, []).append((class_id, missed))
        for epoch, entries in counted.items():
            stats = bank.epochs.setdefault(epoch, EpochClassStats.empty(num_classes))
            if not entries:
                stats.missed = None
            for class_id, missed in entries:
                if not 0 <= class_id < num_classes:
                    raise IndexError(f"missed-pixel entry of class {class_id} (epoch {epoch}) is outside the classes")
                stats.missed[class_id] = missed  # type: ignore[index]
    return bank


def _read_confusions(db: sqlite3.Connection, num_classes: int) -> dict[str, list[tuple[int, int]]]:
    """sample_id -> its (true * C + pred, pixels) confusion entries, sorted as `SampleStats` keeps them."""
    confusions: dict[str, list[tuple[int, int]]] = {}
    query = "SELECT * FROM sample_confusion ORDER BY sample_id, true_class, pred_class"
    for sample_id, true_class, pred_class, pixels in db.execute(query):
        if not (0 <= true_class < num_classes and 0 <= pred_class < num_classes):
            raise IndexError(f"confusion entry ({true_class}, {pred_class}) of {sample_id!r} is outside the classes")
        confusions.setdefault(sample_id, []).append((true_class * num_classes + pred_class, pixels))
    return confusions


def has_table(db: sqlite3.Connection, table: str) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name = ?", (table,)).fetchone() is not None


def _read_decisions(db: sqlite3.Connection, num_classes: int) -> dict[str, list[tuple[int, int]]]:
    """sample_id -> its ((class * 2 + true) * 2 + predicted, pixels) multi-label entries, sorted."""
    decisions: dict[str, list[tuple[int, int]]] = {}
    query = "SELECT * FROM sample_decisions ORDER BY sample_id, class_id, true_present, pred_present"
    for sample_id, class_id, true_present, pred_present, pixels in db.execute(query):
        if not (0 <= class_id < num_classes and true_present in (0, 1) and pred_present in (0, 1)):
            raise IndexError(f"decision entry ({class_id}, {true_present}, {pred_present}) of {sample_id!r} is invalid")
        decisions.setdefault(sample_id, []).append(((class_id * 2 + true_present) * 2 + pred_present, pixels))
    return decisions


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
    with open_store(path) as db:
        row = db.execute(
            "SELECT height, width, hard_mask, loss_map FROM mined WHERE sample_id=?", (sample_id,)
        ).fetchone()
    if row is None:
        raise KeyError(f"sample {sample_id!r} was not mined into {path}")
    with _decoding(Path(path)):
        height, width, mask_blob, loss_blob = row
        mask = np.unpackbits(np.frombuffer(zlib.decompress(mask_blob), np.uint8))[: height * width]
        quantized = np.frombuffer(zlib.decompress(loss_blob), np.uint8).reshape(height, width)
        return mask.reshape(height, width).astype(bool), np.expm1(quantized.astype(np.float32) / LOSS_SCALE)
