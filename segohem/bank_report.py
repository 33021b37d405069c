"""Questions asked of a hard-pixel store: hardest images, most confused pairs, hardness per class.

Every query opens the store read-only (`open_store`): asking never changes the file.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from segohem.bank_store import has_table, open_store, read_meta


def hardest_images(path: str | Path, *, class_name: str | None = None, top: int = 10) -> list[dict[str, Any]]:
    """Images ranked by score (EMA kept fraction x EMA hard loss), or by hard pixels of one class
    (multi-label stores: hard decisions on pixels that hold the class)."""
    meta = read_meta(path)
    class_names = meta["class_names"]
    with open_store(path) as db:
        if class_name is None:
            rows = db.execute(
                "SELECT sample_id, score, ema_kept_fraction, ema_hard_loss, hard_pixels, seen FROM samples "
                "ORDER BY score DESC, sample_id LIMIT ?", (top,)
            ).fetchall()  # fmt: skip
            keys = ("sample_id", "score", "ema_kept_fraction", "ema_hard_loss", "hard_pixels", "seen")
            return [dict(zip(keys, row, strict=True)) for row in rows]
        if class_name not in class_names:
            raise ValueError(f"unknown class {class_name!r}; classes: {', '.join(class_names)}")
        source = (
            "sample_decisions c JOIN samples s USING(sample_id) WHERE c.class_id = ? AND c.true_present = 1"
            if meta["multilabel"] else "sample_confusion c JOIN samples s USING(sample_id) WHERE c.true_class = ?"
        )  # fmt: skip
        rows = db.execute(
            f"SELECT c.sample_id, SUM(c.pixels) AS hard, s.score FROM {source} GROUP BY c.sample_id "
            "ORDER BY hard DESC, c.sample_id LIMIT ?", (class_names.index(class_name), top)
        ).fetchall()  # fmt: skip
    return [{"sample_id": s, f"hard_{class_name}_pixels": h, "score": sc} for s, h, sc in rows]


def confused_pairs(path: str | Path, *, top: int = 10) -> list[dict[str, Any]]:
    """(true, predicted) class pairs with the most hard pixels, excluding correct-but-unsure ones.

    Multi-label stores have no pairs (a pixel holds any number of classes): their rows are
    (class, error) with error ``missed`` (present, predicted absent) or ``false positive``.
    """
    meta = read_meta(path)
    class_names = meta["class_names"]
    if meta["multilabel"]:
        with open_store(path) as db:
            rows = db.execute(
                "SELECT class_id, true_present, SUM(pixels) AS n, COUNT(DISTINCT sample_id) FROM sample_decisions "
                "WHERE true_present != pred_present GROUP BY class_id, true_present ORDER BY n DESC, class_id LIMIT ?",
                (top,),
            ).fetchall()  # fmt: skip
        return [{"class": class_names[c], "error": "missed" if t else "false positive", "hard_pixels": n, "images": k}
                for c, t, n, k in rows]  # fmt: skip
    with open_store(path) as db:
        rows = db.execute(
            "SELECT true_class, pred_class, SUM(pixels) AS n, COUNT(DISTINCT sample_id) FROM sample_confusion "
            "WHERE true_class != pred_class GROUP BY true_class, pred_class ORDER BY n DESC LIMIT ?", (top,)
        ).fetchall()  # fmt: skip
    return [{"true": class_names[t], "predicted": class_names[p], "hard_pixels": n, "images": k} for t, p, n, k in rows]


def class_hardness(path: str | Path) -> list[dict[str, Any]]:
    """Per epoch and class: the fraction of the class's training pixels that were hard, and the
    fraction that were hard and predicted as another class (1 - its training recall under
    threshold OHEM, see `EpochClassStats.missed_fraction`; None in stores written before misses
    were counted)."""
    with open_store(path) as db:
        counted = has_table(db, "epoch_missed")
        missed = "m.missed_pixels" if counted else "NULL"
        join = "LEFT JOIN epoch_missed m USING(epoch, class_id)" if counted else ""
        rows = db.execute(
            f"SELECT e.epoch, e.class_name, e.hard_pixels, e.valid_pixels, e.hard_fraction, {missed} "
            f"FROM epoch_classes e {join} ORDER BY e.epoch, e.class_id"
        ).fetchall()  # fmt: skip
    keys = ("epoch", "class", "hard_pixels", "valid_pixels", "hard_fraction", "missed_pixels")
    return [
        {**dict(zip(keys, row, strict=True)),
         "missed_fraction": None if row[5] is None else row[5] / max(1, row[3])}
        for row in rows
    ]  # fmt: skip


def format_rows(rows: list[dict[str, Any]], fmt: str) -> str:
    """Render rows as an aligned table, CSV or JSON."""
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if not rows:
        return "(no rows)"
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue().rstrip("\n")
    cells = [[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values()] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(rows[0])]
    lines = ["  ".join(h.ljust(w) for h, w in zip(rows[0], widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)) for cell in cells]
    return "\n".join(lines)
