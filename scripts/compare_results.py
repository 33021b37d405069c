"""Are two benchmark results of the same method and seed the same numbers? (reruns on other commits)

Reads the result files (``<method>-s<seed>.json``, written by camvid_benchmark.py) that two
folders share and prints, per run, both commits, the final mIoU of each, and the largest
per-class IoU difference. The same seed on the same machine and processor gives bit-identical
numbers on one commit; a difference here means the code (or the machine) changed what a run
computes.

    python scripts/compare_results.py docs/results/camvid-full docs/results/camvid-full-repro
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def compare(first: Path, second: Path) -> list[str]:
    """One line per result file that both folders hold, in name order."""
    lines = []
    shared = sorted({p.name for p in first.glob("*-s*.json")} & {p.name for p in second.glob("*-s*.json")})
    for name in shared:
        a, b = (json.loads((folder / name).read_text()) for folder in (first, second))
        classes = list(a["final_iou"])
        if set(classes) != set(b["final_iou"]):
            lines.append(f"{name}: different classes, not comparable")
            continue
        worst = max(classes, key=lambda c: abs(a["final_iou"][c] - b["final_iou"][c]))
        gap = 100 * abs(a["final_iou"][worst] - b["final_iou"][worst])
        same = all(a["final_iou"][c] == b["final_iou"][c] for c in classes) and a["final_miou"] == b["final_miou"]
        lines.append(
            f"{name}: {str(a.get('commit', '-'))[:7]} {100 * a['final_miou']:.2f} | "
            f"{str(b.get('commit', '-'))[:7]} {100 * b['final_miou']:.2f} | "
            + ("bit-identical" if same else f"largest class gap {gap:.2f} ({worst})")
            + f" | {a.get('cpu', '?')} / {b.get('cpu', '?')}"
        )
    return lines or ["no result file in both folders"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    args = parser.parse_args()
    print("\n".join(compare(args.first, args.second)))


if __name__ == "__main__":
    main()
