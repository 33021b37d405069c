"""`segohem check-data`: scan a dataset's splits, print the problems and label statistics as a
table or JSON; exit status 2 when something would stop training."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from segohem.config import Config, ConfigError
from segohem.data import SPLITS, ClassInfo, class_info
from segohem.data_check import ABSENT, ERROR, SplitListing, default_workers, list_split
from segohem.data_report import SplitReport, count_errors, scan_dataset

SHOWN_PER_KIND = 5  # problems of one kind listed in the table; JSON lists them all
WEIGHTING = "median-frequency balancing (Eigen & Fergus, ICCV 2015)"


def chosen_listings(cfg: Config, info: ClassInfo, split: str) -> list[SplitListing]:
    """The listing of ``split``; for ``all`` train, val and test, test left out when it is absent."""
    listings = [list_split(cfg.data, info, split=name) for name in (SPLITS if split == "all" else [split])]
    absent = [
        listing for listing in listings
        if split == "all" and listing.split == "test" and not listing.pairs and not cfg.data.test_list
        and all(problem.kind in ABSENT for problem in listing.problems)
    ]  # fmt: skip
    return [listing for listing in listings if listing not in absent]


def run_check_data(cfg: Config, *, split: str, fmt: str, workers: int | None) -> int:
    """Check ``split`` (or ``all``) of ``cfg``'s dataset; prints the report, returns the exit status."""
    if cfg.data.kind == "synthetic":
        raise ConfigError("check-data reads datasets from files; data.kind=synthetic is generated in memory")
    info = class_info(cfg.data)
    workers = workers or default_workers()
    started = time.perf_counter()
    reports = scan_dataset(chosen_listings(cfg, info, split), data=cfg.data, augment=cfg.augment, info=info,
                           workers=workers, progress=cfg.train.progress)  # fmt: skip
    seconds = time.perf_counter() - started
    if fmt == "json":
        print(json.dumps(report_dict(cfg, info, reports, seconds=seconds), indent=2))
    else:
        num_pairs = sum(report.num_pairs for report in reports)
        summary = f"{num_pairs} samples checked in {seconds:.1f}s with {workers} worker(s)"
        print(format_report(cfg, info, reports, summary=summary))
    errors = [problem for report in reports for problem in report.problems if problem.severity == ERROR]
    if errors:
        first = errors[0]
        print(f"segohem check-data: error: {len(errors)} problem(s) would stop training; first: {first.file}: "
              f"{first.detail}", file=sys.stderr)  # fmt: skip
        return 2
    return 0


def _classes(report: SplitReport, info: ClassInfo) -> list[dict[str, Any]]:
    total, num_pairs = max(report.total_pixels, 1), max(report.num_pairs, 1)
    weights = [None] * info.num_classes if info.multilabel else report.class_weights()  # a softmax's weights
    return [
        {"id": i, "name": name, "pixels": int(report.class_pixels[i]), "share": report.class_pixels[i] / total,
         "images": int(report.class_images[i]), "presence": report.class_images[i] / num_pairs, "weight": weights[i]}
        for i, name in enumerate(info.names)
    ]  # fmt: skip


def _outside(report: SplitReport) -> list[dict[str, Any]]:
    return [
        {"value": value, "pixels": report.outside_pixels[value], "files": len(files), "examples": files[:3]}
        for value, files in sorted(report.outside_files.items())
    ]


def _suggested_weights(report: SplitReport) -> str:
    """``ohem.class_weight=[...]`` to paste; an absent class gets 1.0 (it contributes no loss anyway)."""
    weights = ", ".join(f"{w:.3g}" if w is not None else "1.0" for w in report.class_weights())
    return f"ohem.class_weight=[{weights}]"


def report_dict(cfg: Config, info: ClassInfo, reports: list[SplitReport], *, seconds: float) -> dict[str, Any]:
    errors, warnings = count_errors(reports)
    return {
        "dataset": {
            "kind": cfg.data.kind,
            "root": cfg.data.root,
            "class_names": list(info.names),
            "ignore_index": info.ignore_index,
            "mask_format": cfg.data.mask_format,
        },
        "seconds": round(seconds, 3),
        "errors": errors,
        "warnings": warnings,
        "class_weight_method": WEIGHTING,
        "splits": [
            {
                "split": report.split,
                "images": report.num_images,
                "label_files": report.num_masks,
                "pairs": report.num_pairs,
                "problems": [vars(problem) for problem in report.problems],
                "sizes": [{"height": h, "width": w, "images": n} for (h, w), n in sorted(report.sizes.items())],
                "pixels": report.total_pixels,
                "ignore_fraction": report.ignore_pixels / max(report.total_pixels, 1),
                "classes": _classes(report, info),
                "labels_outside_classes": _outside(report),
                "suggested_override": None if info.multilabel else _suggested_weights(report),
            }
            for report in reports
        ],
    }


def _problem_lines(report: SplitReport) -> list[str]:
    lines: list[str] = []
    kinds: dict[str, int] = {}
    for problem in report.problems:
        kinds[problem.kind] = kinds.get(problem.kind, 0) + 1
        if kinds[problem.kind] <= SHOWN_PER_KIND:
            lines.append(f"  {problem.severity:<7} {problem.kind:<22} {problem.file}: {problem.detail}")
    lines += [f"  ... {n - SHOWN_PER_KIND} more {kind} (--format json lists all)"
              for kind, n in kinds.items() if n > SHOWN_PER_KIND]  # fmt: skip
    return lines or ["  no problems"]


def _class_lines(report: SplitReport, info: ClassInfo) -> list[str]:
    lines = [f"  {'class':<16}{'pixels':>12}{'share':>9}{'images':>8}{'presence':>10}{'weight':>8}"]
    for row in _classes(report, info):
        weight = f"{row['weight']:.3f}" if row["weight"] is not None else "absent" if not row["images"] else "-"
        lines.append(f"  {row['name'][:15]:<16}{row['pixels']:>12}{row['share']:>9.2%}{row['images']:>8}"
                     f"{row['presence']:>10.1%}{weight:>8}")  # fmt: skip
    lines.append(f"  ignored (id {info.ignore_index}): {report.ignore_pixels / report.total_pixels:.2%} of pixels")
    if not info.multilabel:  # ohem.class_weight weighs a softmax over classes
        lines.append(f"  suggested class weights, {WEIGHTING}: {_suggested_weights(report)}")
    return lines


def format_report(cfg: Config, info: ClassInfo, reports: list[SplitReport], *, summary: str) -> str:
    lines = [f"{cfg.data.kind} dataset at {cfg.data.root}: {info.num_classes} classes, ignore id {info.ignore_index}"]
    for report in reports:
        sizes = ", ".join(f"{h}x{w} ({n})" for (h, w), n in sorted(report.sizes.items(), key=lambda s: -s[1])[:4])
        lines += ["", f"{report.split}: {report.num_images} images, {report.num_masks} label files; "
                      f"sizes (height x width): {sizes or 'none readable'}", *_problem_lines(report)]  # fmt: skip
        lines += [f"  label value {o['value']} (not a class, not the ignore id): {o['pixels']} px in {o['files']} "
                  f"file(s), e.g. {', '.join(o['examples'])}" for o in _outside(report)]  # fmt: skip
        lines += _class_lines(report, info) if report.total_pixels else []
    errors, warnings = count_errors(reports)
    return "\n".join([*lines, "", f"{summary}: {errors} error(s), {warnings} warning(s)"])
