"""Property test: `select_hard_pixels` against a slow per-row sort written straight from the rule."""

from __future__ import annotations

import itertools
import math
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from segohem import ohem
from segohem.ohem import PixelAmount, select_hard_pixels

GRID = 10  # true-class probabilities are k / GRID, k = 1..GRID: many exact ties
THRESHOLDS = [0.35, 0.55, 0.75, 0.95, 1.0]  # never strictly between grid points and a tie


def amounts(*, positive: bool) -> st.SearchStrategy[PixelAmount]:
    least = 1 if positive else 0
    return st.one_of(
        st.integers(least, 30),
        st.floats(min_value=0.01, max_value=0.99),
        st.integers(least, 100).map(lambda percent: f"{percent}%"),
    )


@st.composite
def batches(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """(probs (N, H, W) float64 on the grid, valid (N, H, W) bool); some images fully ignored."""
    n, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 5))
    probs = draw(arrays(np.int64, (n, h, w), elements=st.integers(1, GRID))) / GRID
    ignored = draw(arrays(np.bool_, (n, h, w)))
    all_ignored = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    return probs, ~(ignored | all_ignored[:, None, None])


def reference_count(amount: PixelAmount, *, num_valid: int, images_per_row: int) -> int:
    if isinstance(amount, int):
        return min(amount * images_per_row, num_valid)
    fraction = float(amount.rstrip("%")) / 100 if isinstance(amount, str) else amount
    return min(math.ceil(num_valid * fraction), num_valid)


def reference_row(
    probs: list[float], valid: list[bool], *, mode: str, thresh: float, target: PixelAmount, floor: float, images: int
) -> tuple[set[int], float]:
    """Kept indices of one row and the probability threshold used, by sorting in plain Python."""
    candidates = [j for j in range(len(probs)) if valid[j]]
    if mode == "none":
        return set(candidates), 1.0
    hardest_first = sorted(candidates, key=lambda j: (probs[j], j))  # lowest p first, then lowest index
    k = reference_count(target, num_valid=len(candidates), images_per_row=images)
    k = max(k, math.ceil(len(candidates) * floor))
    if mode == "threshold":
        below = {j for j in candidates if probs[j] < thresh}
        if len(below) >= k:
            return below, thresh
    if k == 0:
        return set(), 1.0
    return set(hardest_first[:k]), probs[hardest_first[k - 1]]


def check_selection(data: st.DataObject, device: str) -> None:
    """One drawn batch and rule, selected in every mode and scope, against `reference_row`."""
    probs, valid = data.draw(batches())
    thresh = data.draw(st.sampled_from(THRESHOLDS))
    min_kept, top_k = data.draw(amounts(positive=False)), data.draw(amounts(positive=True))
    floor = data.draw(st.sampled_from([0.0, 0.0, 0.3, 1.0]))
    pixel_loss = -torch.log(torch.tensor(probs, dtype=torch.float32, device=device))
    for mode, scope in itertools.product(["threshold", "topk", "none"], ["image", "batch"]):
        selection = select_hard_pixels(
            pixel_loss, torch.tensor(valid, device=device), mode=mode, thresh=thresh,  # type: ignore[arg-type]
            min_kept=min_kept, top_k=top_k, scope=scope, keep_floor=floor,  # type: ignore[arg-type]
        )  # fmt: skip
        n = len(probs)
        images_per_row = n if scope == "batch" else 1
        row_probs, row_valid = probs.reshape(n // images_per_row, -1), valid.reshape(n // images_per_row, -1)
        expected_mask = np.zeros_like(row_valid)
        expected_threshold: list[float] = []
        for r in range(len(row_probs)):
            kept, threshold = reference_row(
                row_probs[r].tolist(), row_valid[r].tolist(), mode=mode, thresh=thresh,
                target=min_kept if mode == "threshold" else top_k, floor=floor, images=images_per_row,
            )  # fmt: skip
            expected_mask[r, sorted(kept)] = True
            expected_threshold += [threshold] * images_per_row
        expected_mask = expected_mask.reshape(valid.shape)
        where = f"mode={mode}, scope={scope}"
        assert np.array_equal(selection.hard_mask.cpu().numpy(), expected_mask), where
        assert selection.num_kept.tolist() == expected_mask.reshape(n, -1).sum(1).tolist(), where
        assert selection.num_valid.tolist() == valid.reshape(n, -1).sum(1).tolist(), where
        np.testing.assert_allclose(selection.prob_threshold.cpu().numpy(), expected_threshold, rtol=1e-5, err_msg=where)


@pytest.mark.parametrize("sync_free", [False, True], ids=["kthvalue", "sort"])
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_selection_matches_a_sorted_reference(sync_free: bool, data: st.DataObject) -> None:
    """Both paths against the reference: the CPU's (kthvalue where needed, host decisions) and
    the one CUDA takes (every row sorted, per-row k applied on the device), here on the CPU."""
    with mock.patch.object(ohem, "_sync_free", lambda tensor: sync_free):
        check_selection(data, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_selection_on_cuda_matches_a_sorted_reference(data: st.DataObject) -> None:
    check_selection(data, "cuda")
