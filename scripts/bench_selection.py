"""OHEM row selection on CUDA: the stable-sort path against kthvalue, and that both agree.

    python scripts/bench_selection.py        # needs a CUDA device

First compares the CUDA path (stable segmented sort) with the CPU path (kthvalue) on 200
random cases, half of them full of exact ties; then times the selection alone both ways on
the GPU, median of 25 after one warm-up.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

from segohem.ohem import _topk_rows


def agreement(cases: int = 200) -> int:
    gen = torch.Generator().manual_seed(0)
    same = 0
    for trial in range(cases):
        rows, width = 4, int(torch.randint(1, 200000, (1,), generator=gen))
        if trial % 2:
            row_loss = torch.randint(0, 5, (rows, width), generator=gen).float()
        else:
            row_loss = torch.rand(rows, width, generator=gen)
        valid = torch.rand(rows, width, generator=gen) > 0.2
        valid[:, 0] = True
        row_loss = row_loss.masked_fill(~valid, -math.inf)
        keep = (torch.rand(rows, generator=gen) * valid.sum(1)).long().clamp(min=1)
        mask_cpu, kth_cpu = _topk_rows(row_loss, keep)
        mask_gpu, kth_gpu = _topk_rows(row_loss.cuda(), keep.cuda())
        same += int(torch.equal(mask_cpu, mask_gpu.cpu()) and torch.equal(kth_cpu, kth_gpu.cpu()))
    return same


def median_ms(fn: Callable[[], object], repeats: int = 25) -> float:
    times = []
    for i in range(repeats + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        if i:
            times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA device")
    print(f"CUDA sort path vs CPU kthvalue path: {agreement()}/200 identical")
    for rows, width, k in [(4, 524288, 100000), (8, 43200, 4320), (8, 43200, 8640)]:
        loss = torch.rand(rows, width, device="cuda")
        keep = torch.full((rows,), k, device="cuda")
        by_kth = median_ms(partial(_topk_rows, loss, keep, by_sort=False))
        by_sort = median_ms(partial(_topk_rows, loss, keep, by_sort=True))
        print(
            f"rows {rows} x {width}, k {k}: kthvalue {by_kth:.2f} ms, stable sort {by_sort:.2f} ms "
            f"({by_kth / by_sort:.1f}x)"
        )


if __name__ == "__main__":
    main()
