"""Robustness of the hard-pixel store: read-only queries, corrupt files, rebuilds and atomic saves."""

import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from segohem.bank import EpochClassStats, HardPixelBank, SampleStats, confusion_fields
from segohem.bank_report import class_hardness, confused_pairs, hardest_images
from segohem.bank_store import (
    TEMP_PREFIX,
    StoreError,
    check_store,
    load_bank,
    load_mined,
    read_meta,
    save_bank,
    save_mined,
)
from segohem.mining import recall_weights

CLASSES = ("a", "b", "c")
READERS = {
    "load_bank": load_bank,
    "read_meta": read_meta,
    "hardest_images": hardest_images,
    "hardest_images_by_class": lambda path: hardest_images(path, class_name="b"),
    "confused_pairs": confused_pairs,
    "class_hardness": class_hardness,
    "load_mined": lambda path: load_mined(path, "s0"),
}


def big_bank(num_samples=300, *, seed=0):
    """A bank whose store spans many pages, so that a truncation loses table contents."""
    gen = np.random.default_rng(seed)
    bank = HardPixelBank(3, cell_size=4)
    for i in range(num_samples):
        seen_acc = gen.integers(1, 16, (6, 8)).astype(np.float32)
        bank.samples[f"s{i}"] = SampleStats(
            height=24, width=32, hard_acc=np.floor(seen_acc * gen.random((6, 8))).astype(np.float32),
            seen_acc=seen_acc, **confusion_fields(gen.integers(0, 50, (3, 3))), seen=int(gen.integers(1, 5)),
            ema_kept_fraction=float(gen.random()), ema_hard_loss=float(gen.random() * 3), last_epoch=2,
        )  # fmt: skip
    for epoch in range(3):
        valid = gen.integers(100, 1000, 3)
        # the last epoch as a bank restored from before misses were counted holds it: not counted
        bank.epochs[epoch] = EpochClassStats(hard=valid // 3, valid=valid, missed=valid // 5 if epoch < 2 else None)
    return bank


def assert_same_bank(restored, bank):
    assert (restored.num_classes, restored.cell_size, restored.momentum) == (
        bank.num_classes, bank.cell_size, bank.momentum,
    )  # fmt: skip
    assert sorted(restored.samples) == sorted(bank.samples)
    for key, stats in bank.samples.items():
        back = restored.samples[key]
        assert (back.height, back.width, back.seen, back.last_epoch) == (
            stats.height, stats.width, stats.seen, stats.last_epoch,
        )  # fmt: skip
        assert back.ema_hard_loss == stats.ema_hard_loss and back.ema_kept_fraction == stats.ema_kept_fraction
        np.testing.assert_array_equal(back.hard_acc, stats.hard_acc)  # small integers: exact in float16
        np.testing.assert_array_equal(back.seen_acc, stats.seen_acc)
        np.testing.assert_array_equal(back.dense_confusion(), stats.dense_confusion())
        np.testing.assert_array_equal(back.confusion_pairs, stats.confusion_pairs)
        np.testing.assert_array_equal(back.confusion_counts, stats.confusion_counts)
    assert sorted(restored.epochs) == sorted(bank.epochs)
    for epoch, history in bank.epochs.items():
        np.testing.assert_array_equal(restored.epochs[epoch].hard, history.hard)
        np.testing.assert_array_equal(restored.epochs[epoch].valid, history.valid)
        if history.missed is None:
            assert restored.epochs[epoch].missed is None
        else:
            np.testing.assert_array_equal(restored.epochs[epoch].missed, history.missed)


def saved_store(folder: Path, *, name="hard_pixels.sqlite", bank=None) -> Path:
    path = folder / name
    save_bank(bank or big_bank(), path, class_names=CLASSES, epoch=2)
    gen = np.random.default_rng(1)
    save_mined(path, [(f"s{i}", gen.random((24, 32)) > 0.5, gen.random((24, 32)).astype(np.float32)) for i in range(3)])
    return path


def corrupt(path: Path, kind: str) -> None:
    """Damage a saved store the ways disks and people do."""
    size = path.stat().st_size
    if kind == "random":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    elif kind == "truncated":
        with path.open("r+b") as handle:
            handle.truncate(size // 3)
    elif kind == "zero":
        path.write_bytes(b"")
    elif kind == "garbled_pages":  # a valid header, rubbish in the middle of the tables
        data = bytearray(path.read_bytes())
        data[4096 * 2 : 4096 * 6] = np.random.default_rng(0).integers(0, 256, 4096 * 4, dtype=np.uint8).tobytes()
        path.write_bytes(bytes(data))
    else:
        raise AssertionError(kind)


def foreign_sqlite(path: Path) -> bytes:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE photos(id INTEGER PRIMARY KEY, name TEXT)")
        db.executemany("INSERT INTO photos(name) VALUES (?)", [("one",), ("two",)])
    db.close()
    return path.read_bytes()


@pytest.mark.parametrize("reader", sorted(READERS))
def test_queries_leave_a_foreign_sqlite_file_untouched(tmp_path, reader):
    path = tmp_path / "foreign.sqlite"
    original = foreign_sqlite(path)
    with pytest.raises(StoreError, match=r"foreign\.sqlite.*not a segohem hard-pixel store.*lacks") as caught:
        READERS[reader](path)
    assert "meta" in str(caught.value) and "samples" in str(caught.value)
    assert path.read_bytes() == original
    assert sorted(os.listdir(tmp_path)) == ["foreign.sqlite"]  # no -wal, -shm or -journal either


def test_the_hard_pixels_command_refuses_a_foreign_file_without_touching_it(tmp_path, capsys):
    from segohem.cli.main import main

    path = tmp_path / "foreign.sqlite"
    original = foreign_sqlite(path)
    assert main(["hard-pixels", "--store", str(path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and str(path) in error and "lacks" in error
    assert path.read_bytes() == original and sorted(os.listdir(tmp_path)) == ["foreign.sqlite"]


def test_reading_a_store_whose_path_needs_uri_quoting(tmp_path):
    folder = tmp_path / "odd ?#%20 name"
    folder.mkdir()
    bank = big_bank(20)
    path = saved_store(folder, name="store?mode=rw#.sqlite", bank=bank)
    assert_same_bank(load_bank(path), bank)
    assert len(hardest_images(path, top=5)) == 5
    assert read_meta(path)["class_names"] == list(CLASSES)
    assert load_mined(path, "s0")[0].shape == (24, 32)
    assert check_store(path) is None


@pytest.mark.parametrize("kind", ["random", "truncated", "zero", "garbled_pages"])
@pytest.mark.parametrize("reader", sorted(READERS))
def test_a_corrupt_store_gives_one_clear_error_line_naming_the_file(tmp_path, kind, reader):
    path = saved_store(tmp_path)
    corrupt(path, kind)
    scans_the_garbled_tables = reader in ("load_bank", "hardest_images", "hardest_images_by_class", "confused_pairs")
    if kind == "garbled_pages" and not scans_the_garbled_tables:
        try:  # may read only intact pages; what it must not do is leak a raw sqlite3 error
            READERS[reader](path)
        except StoreError as err:
            assert str(path) in str(err) and "\n" not in str(err)
        return
    with pytest.raises(StoreError) as caught:
        READERS[reader](path)
    message = str(caught.value)
    assert str(path) in message and "\n" not in message


@pytest.mark.parametrize("kind", ["random", "truncated", "zero", "garbled_pages"])
def test_check_store_names_what_is_wrong(tmp_path, kind):
    path = saved_store(tmp_path)
    assert check_store(path) is None
    corrupt(path, kind)
    reason = check_store(path)
    assert reason is not None and str(path) in reason and "\n" not in reason
    expected = {"random": "not an SQLite database", "truncated": "truncated", "zero": "empty",
                "garbled_pages": "corrupt"}[kind]  # fmt: skip
    assert expected in reason


def test_check_store_accepts_a_store_that_only_holds_mined_masks_and_rejects_others(tmp_path):
    mined = tmp_path / "mined.sqlite"
    save_mined(mined, [("x", np.ones((4, 4), bool), np.ones((4, 4), np.float32))])
    assert check_store(mined) is None
    assert "does not exist" in (check_store(tmp_path / "missing.sqlite") or "")
    foreign = tmp_path / "foreign.sqlite"
    foreign_sqlite(foreign)
    assert "lacks" in (check_store(foreign) or "")
    with sqlite3.connect(mined) as db:
        db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', '99')")
    db.close()
    assert "schema version 99" in (check_store(mined) or "")


@pytest.mark.parametrize("kind", ["random", "truncated", "zero", "garbled_pages", "foreign"])
def test_save_bank_rebuilds_a_corrupt_store_from_the_bank(tmp_path, kind):
    path = saved_store(tmp_path)
    if kind == "foreign":
        path.unlink()
        foreign_sqlite(path)
    else:
        corrupt(path, kind)
    bank = big_bank(seed=7)
    with pytest.warns(UserWarning, match=r"hard_pixels\.sqlite.*rebuilding"):
        save_bank(bank, path, class_names=CLASSES, epoch=3)
    assert check_store(path) is None
    assert_same_bank(load_bank(path), bank)
    assert read_meta(path)["epoch"] == "3"
    assert not [name for name in os.listdir(tmp_path) if name.startswith(TEMP_PREFIX)]


def test_save_bank_into_a_valid_store_keeps_mined_masks_and_does_not_warn(tmp_path, recwarn):
    path = saved_store(tmp_path)
    bank = big_bank(seed=3)
    save_bank(bank, path, class_names=CLASSES, epoch=3)
    assert not recwarn.list
    assert_same_bank(load_bank(path), bank)
    assert load_mined(path, "s1")[0].shape == (24, 32)


def test_a_stale_write_ahead_log_of_a_corrupt_store_is_not_replayed_into_the_rebuilt_one(tmp_path):
    path = saved_store(tmp_path)
    script = textwrap.dedent(f"""
        import os, signal, sqlite3
        db = sqlite3.connect({str(path)!r})
        db.execute("PRAGMA journal_mode=WAL")
        with db:
            db.execute("DELETE FROM samples")
            db.execute("INSERT OR REPLACE INTO meta VALUES ('epoch', '77')")
        os.kill(os.getpid(), signal.SIGKILL)  # committed into the log, never checkpointed
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == -9, result.stderr
    assert (tmp_path / "hard_pixels.sqlite-wal").stat().st_size > 0
    corrupt(path, "random")
    bank = big_bank(seed=5)
    with pytest.warns(UserWarning, match="rebuilding"):
        save_bank(bank, path, class_names=CLASSES, epoch=3)
    assert read_meta(path)["epoch"] == "3"
    assert_same_bank(load_bank(path), bank)


def test_a_kill_during_a_rebuild_leaves_the_old_file_and_the_next_save_cleans_up(tmp_path):
    path = saved_store(tmp_path)
    corrupt(path, "random")
    damaged = path.read_bytes()
    script = textwrap.dedent(f"""
        import os, signal, warnings
        from segohem import bank_store
        from segohem.bank import HardPixelBank

        def replace(*args):
            os.kill(os.getpid(), signal.SIGKILL)  # the new store is complete, not yet in place

        bank_store.os.replace = replace
        warnings.simplefilter("ignore")
        bank_store.save_bank(HardPixelBank(3), {str(path)!r}, class_names=("a", "b", "c"), epoch=9)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == -9, result.stderr
    assert path.read_bytes() == damaged  # the old file, as it was
    assert [name for name in os.listdir(tmp_path) if name.startswith(TEMP_PREFIX)]  # the interrupted temp
    bank = big_bank(seed=2)
    with pytest.warns(UserWarning, match="rebuilding"):
        save_bank(bank, path, class_names=CLASSES, epoch=3)
    assert_same_bank(load_bank(path), bank)
    assert not [name for name in os.listdir(tmp_path) if name.startswith(TEMP_PREFIX)]


def test_stale_temp_files_are_removed_by_a_normal_save(tmp_path, recwarn):
    path = saved_store(tmp_path)
    stale = [
        tmp_path / f"{TEMP_PREFIX}hard_pixels.sqlite.abc123",
        tmp_path / f"{TEMP_PREFIX}hard_pixels.sqlite.abc123-journal",
    ]
    for leftover in stale:
        leftover.write_bytes(b"half a store")
    other = tmp_path / f"{TEMP_PREFIX}other.sqlite.xyz"  # another store's temp in the same folder: not ours
    other.write_bytes(b"x")
    save_bank(big_bank(seed=4), path, class_names=CLASSES, epoch=3)
    assert not any(leftover.exists() for leftover in stale) and other.exists()
    assert not recwarn.list


def test_a_store_written_before_missed_pixels_were_counted_reads_them_as_unknown(tmp_path):
    path = tmp_path / "old.sqlite"
    save_bank(big_bank(5), path, class_names=list(CLASSES), epoch=2)
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE epoch_missed")
    db.close()
    assert check_store(path) is None
    restored = load_bank(path)
    assert sorted(restored.epochs) == [0, 1, 2] and all(h.missed is None for h in restored.epochs.values())
    assert recall_weights(restored, power=1.0) is None  # nothing to weigh by: the loop keeps its weights
    rows = class_hardness(path)  # the report still reads it, misses unknown
    assert len(rows) == 9 and all(r["missed_pixels"] is None and r["missed_fraction"] is None for r in rows)
    save_bank(restored, path, class_names=list(CLASSES), epoch=2)  # and it is written back as it was
    assert all(h.missed is None for h in load_bank(path).epochs.values())


def test_a_store_in_a_folder_that_cannot_be_written_is_read_without_complaint(tmp_path):
    # a colleague's run, a read-only mount: SQLite cannot make the -shm file a WAL store's reader needs
    folder = tmp_path / "theirs"
    folder.mkdir()
    bank = big_bank(20)
    path = saved_store(folder, bank=bank)
    before = sorted(p.name for p in folder.iterdir())
    folder.chmod(0o555)
    frozen = False
    try:
        if os.access(folder, os.W_OK):  # root writes through permissions: the immutable attribute stops it
            frozen = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
        if os.access(folder, os.W_OK):
            pytest.skip("cannot make a folder unwritable here (root, and chattr +i not supported)")
        assert_same_bank(load_bank(path), bank)
        assert len(hardest_images(path, top=5)) == 5
        assert check_store(path) is None
        assert sorted(p.name for p in folder.iterdir()) == before
    finally:
        if frozen:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)
