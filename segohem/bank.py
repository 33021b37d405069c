"""The hard-pixel dictionary: what was hard, per image, region and class, across a whole run.

`HardPixelBank` is keyed by the dataset's stable ``sample_id`` and changed only through
`update` (called by the loop with each step's OHEM result). Hard pixels are mapped back to
the **original image's coordinates** through the source-coordinate map that the data
pipeline carries beside the mask, so crops, rescales and flips land in the right cells.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor


@dataclass
class SampleStats:
    """Everything the bank knows about one image.

    hard_acc / seen_acc: (grid_h, grid_w) per-cell decayed sums of hard and of observed valid
    pixels, in original-image cells of ``cell_size`` pixels; hardness = hard_acc / seen_acc.
    The (C, C) confusion of hard pixels by true class (rows) and predicted class (columns) is
    held sparse, since an image meets a few of the C classes (a dense one is 180 kB at C=150):
    confusion_pairs (K,) int32 sorted flat indices true * C + pred of its non-zero entries,
    confusion_counts (K,) int64 their hard pixels. `dense_confusion` builds the matrix; its row
    sums are `hard_positives` (pixels of c the model struggles with), its column sums minus the
    diagonal `hard_negatives` (pixels wrongly called c).

    Multi-label classes (``multilabel``): a pixel holds a yes / no decision per class, so the
    confusion is (C, 2, 2) [class, true, predicted] of hard (pixel, class) decisions, flat index
    (class * 2 + true) * 2 + predicted; `hard_positives` counts hard decisions on pixels of the
    class, `hard_negatives` the hard ones wrongly called the class (false positives).
    """

    height: int
    width: int
    hard_acc: np.ndarray
    seen_acc: np.ndarray
    num_classes: int
    confusion_pairs: np.ndarray
    confusion_counts: np.ndarray
    seen: int = 0
    ema_kept_fraction: float = 0.0
    ema_hard_loss: float = 0.0
    last_epoch: int = -1
    multilabel: bool = False

    @property
    def hardness(self) -> np.ndarray:
        """(grid_h, grid_w) float32 fraction of hard pixels per cell; NaN where never observed."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.seen_acc > 0, self.hard_acc / self.seen_acc, np.nan).astype(np.float32)

    @property
    def score(self) -> float:
        """Image-level hardness: EMA kept fraction x EMA mean hard loss."""
        return self.ema_kept_fraction * self.ema_hard_loss

    def dense_confusion(self) -> np.ndarray:
        """(C, C) int64 hard pixels by (true, predicted) class, built from the sparse entries
        (multi-label: (C, 2, 2) by class, true and predicted presence)."""
        shape = (self.num_classes, 2, 2) if self.multilabel else (self.num_classes, self.num_classes)
        dense = np.zeros(int(np.prod(shape)), np.int64)
        dense[self.confusion_pairs] = self.confusion_counts
        return dense.reshape(shape)

    @property
    def confusion(self) -> np.ndarray:
        """A new dense (C, C) copy, `dense_confusion`; writing to it changes nothing."""
        return self.dense_confusion()

    def hard_positives(self) -> np.ndarray:
        """(C,) int64 hard pixels per true class (the confusion's row sums)."""
        if self.multilabel:
            class_ids, true, _ = split_decisions(self.confusion_pairs)
            return _class_sums(class_ids[true == 1], self.confusion_counts[true == 1], self.num_classes)
        return _class_sums(self.confusion_pairs // self.num_classes, self.confusion_counts, self.num_classes)

    def hard_negatives(self) -> np.ndarray:
        """(C,) int64 hard pixels wrongly predicted as each class (column sums without the diagonal)."""
        if self.multilabel:
            class_ids, true, pred = split_decisions(self.confusion_pairs)
            false_positive = (true == 0) & (pred == 1)
            return _class_sums(class_ids[false_positive], self.confusion_counts[false_positive], self.num_classes)
        true_class, pred_class = np.divmod(self.confusion_pairs, self.num_classes)
        wrong = true_class != pred_class
        return _class_sums(pred_class[wrong], self.confusion_counts[wrong], self.num_classes)

    def add_confusion(self, confusion: np.ndarray) -> None:
        """Add a dense (C, C) int64 confusion of new hard pixels to the sparse entries."""
        new_pairs = np.flatnonzero(confusion).astype(np.int32)
        if not len(new_pairs):
            return
        pairs, where = np.unique(np.concatenate([self.confusion_pairs, new_pairs]), return_inverse=True)
        counts = np.zeros(len(pairs), np.int64)
        np.add.at(counts, where, np.concatenate([self.confusion_counts, confusion.ravel()[new_pairs]]))
        self.confusion_pairs, self.confusion_counts = pairs.astype(np.int32), counts


def split_decisions(pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A multi-label bank's flat indices (class * 2 + true) * 2 + predicted as (class, true,
    predicted) arrays (true / predicted: 0 absent, 1 present)."""
    pairs = np.asarray(pairs, np.int64)
    return pairs // 4, (pairs // 2) % 2, pairs % 2


@dataclass
class EpochClassStats:
    hard: np.ndarray  # (C,) int64 hard pixels per true class
    valid: np.ndarray  # (C,) int64 valid pixels per true class
    # (C,) int64 hard pixels of each true class predicted as another class (multi-label: hard
    # decisions on pixels of the class predicted absent); None in banks saved before it was counted
    missed: np.ndarray | None = None

    @classmethod
    def empty(cls, num_classes: int) -> EpochClassStats:
        return cls(*(np.zeros(num_classes, np.int64) for _ in range(3)))

    def missed_fraction(self) -> np.ndarray | None:
        """(C,) share of each class's valid pixels that were hard and predicted wrong; NaN for a
        class without valid pixels, None when ``missed`` was not counted.

        Under threshold OHEM (a wrong pixel's true-class probability is below 0.5, so below any
        threshold of 0.5 or more) and plain cross-entropy this is 1 - the class's training
        recall; under top-k it falls short of that where more than ``top_k`` of an image is
        wrong (early epochs, large confused regions), since only the kept pixels are counted."""
        if self.missed is None:
            return None
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.valid > 0, self.missed / np.maximum(self.valid, 1), np.nan)


class _InFlight(NamedTuple):
    """One `HardPixelBank.update`'s counts on their way to the host, and what folding them needs."""

    counts: Tensor  # (M,) float64 on the host (pinned when it was copied from CUDA), see `_device_counts`
    ready: Any  # a CUDA event recorded after the copy (query/synchronize), None when already on the host
    sample_ids: list[str]
    sizes: list[tuple[int, int]]  # original (height, width) per image
    epoch: int


class HardPixelBank:
    """Per-sample hard-pixel statistics; ``update`` is the only mutator.

    momentum: weight of the past in the per-sample EMAs (each sample is seen about once per
    epoch, so 0.5 halves the weight of an epoch's observation every epoch).

    On CUDA, ``update`` asks the GPU nothing: it counts on the device and starts one copy to
    pinned host memory; the counts are folded in order on a later ``update`` once their copy
    has landed (at most ``max_in_flight`` wait), and before anything reads the bank (``samples``,
    ``epochs``, ``state_dict`` and ``flush`` wait for them). On the CPU updates fold at once.
    """

    max_in_flight = 4

    def __init__(
        self, num_classes: int, cell_size: int = 8, momentum: float = 0.5, *, multilabel: bool = False
    ) -> None:
        self.num_classes, self.cell_size, self.momentum = num_classes, cell_size, momentum
        self.multilabel = multilabel  # hard (pixel, class) decisions of multi-label masks, see `SampleStats`
        self._samples: dict[str, SampleStats] = {}
        self._epochs: dict[int, EpochClassStats] = {}
        self._in_flight: deque[_InFlight] = deque()

    @property
    def samples(self) -> dict[str, SampleStats]:
        """Statistics per ``sample_id``, every update folded in."""
        self.flush()
        return self._samples

    @samples.setter
    def samples(self, samples: dict[str, SampleStats]) -> None:
        self.flush()
        self._samples = samples

    @property
    def epochs(self) -> dict[int, EpochClassStats]:
        """Hard and valid pixels per class for each epoch, every update folded in."""
        self.flush()
        return self._epochs

    @epochs.setter
    def epochs(self, epochs: dict[int, EpochClassStats]) -> None:
        self.flush()
        self._epochs = epochs

    def _get(self, sample_id: str, height: int, width: int) -> SampleStats:
        stats = self._samples.get(sample_id)
        if stats is None:
            grid = (math.ceil(height / self.cell_size), math.ceil(width / self.cell_size))
            stats = SampleStats(
                height=height, width=width, hard_acc=np.zeros(grid, np.float32), seen_acc=np.zeros(grid, np.float32),
                multilabel=self.multilabel, **_empty_confusion(self.num_classes),
            )  # fmt: skip
            self._samples[sample_id] = stats
        return stats

    @torch.no_grad()
    def update(
        self,
        *,
        sample_ids: list[str],
        hard_mask: Tensor,
        pixel_loss: Tensor,
        target: Tensor,
        pred: Tensor,
        source_yx: Tensor,
        source_hw: Tensor,
        epoch: int,
    ) -> None:
        """Fold one batch into the bank (on CUDA: start to; see the class docstring).

        hard_mask (N, H, W) bool; pixel_loss (N, H, W) float; target, pred (N, H, W) int64
        (pred = argmax of the logits); a multi-label bank takes hard_mask, pixel_loss, target
        (0 / 1 / ignore) and pred (bool) of shape (N, C, H, W); source_yx (N, 2, H, W) float, the original-image row
        and column of every pixel (any value where the target is ignored; a negative row marks a
        pixel the bank does not count, e.g. one pasted in from another image); source_hw (N, 2)
        int, original height and width, on the CPU as the loader gives it (on the GPU, reading
        it would be a host sync).
        """
        sizes = [(int(h), int(w)) for h, w in source_hw.tolist()]
        if (hard_mask.ndim == 4) != self.multilabel:
            raise ValueError(
                f"a {'multi-label' if self.multilabel else 'single-label'} bank takes hard masks of "
                f"{'(N, C, H, W)' if self.multilabel else '(N, H, W)'}, got {tuple(hard_mask.shape)}"
            )
        count = self._multilabel_counts if self.multilabel else self._device_counts
        counts = count(hard_mask=hard_mask, pixel_loss=pixel_loss, target=target, pred=pred,
                                     source_yx=source_yx, sizes=sizes)  # fmt: skip
        counts, ready = _send_to_host(counts)
        self._in_flight.append(_InFlight(counts, ready, list(sample_ids), sizes, epoch))
        self._fold_landed()

    def flush(self) -> None:
        """Fold every update still in flight (waits for their copies; no-op on the CPU)."""
        while self._in_flight:
            self._fold(self._in_flight.popleft(), wait=True)

    def _fold_landed(self) -> None:
        """Fold, in order, the updates whose counts have reached the host; wait only for the
        oldest beyond ``max_in_flight``."""
        while self._in_flight:
            oldest = self._in_flight[0]
            landed = oldest.ready is None or oldest.ready.query()
            if not (landed or len(self._in_flight) > self.max_in_flight):
                return
            self._fold(self._in_flight.popleft(), wait=not landed)

    def _device_counts(
        self, *, hard_mask: Tensor, pixel_loss: Tensor, target: Tensor, pred: Tensor, source_yx: Tensor,
        sizes: list[tuple[int, int]],
    ) -> Tensor:  # fmt: skip
        """Everything `_fold` needs from one batch, counted where the tensors are, in one tensor.

        Returns (M,) float64 (counts are exact integers): per-image confusions (N*C*C), valid
        pixels per class (C), kept and valid pixels per image (N, N), hard and observed pixels per
        original-image cell of every image (2 x the sum of the grid sizes), hard-pixel loss sums (N).
        Fixed shapes and scatter-adds only: nothing here waits for the device.
        """
        num_images, num_classes, device = hard_mask.shape[0], self.num_classes, target.device
        tracked = source_yx[:, 0] >= 0  # pixels of this image (not pasted from another)
        valid_mask = (target >= 0) & (target < num_classes) & tracked
        hard_mask = hard_mask & tracked
        safe_target, safe_pred = target.clamp(0, num_classes - 1), pred.clamp(0, num_classes - 1)
        triple = torch.arange(num_images, device=device).view(-1, 1, 1) * num_classes + safe_target
        triple = triple * num_classes + safe_pred  # (N, H, W) index of (image, true, pred)
        parts = [
            _count(triple, hard_mask, num_images * num_classes**2), _count(safe_target, valid_mask, num_classes),
            hard_mask.flatten(1).sum(1), valid_mask.flatten(1).sum(1),
            *self._cell_counts(hard_mask & valid_mask, valid_mask, source_yx=source_yx, sizes=sizes),
            (pixel_loss.float() * hard_mask).flatten(1).sum(1),
        ]  # fmt: skip
        return torch.cat([part.double() for part in parts])

    def _multilabel_counts(
        self, *, hard_mask: Tensor, pixel_loss: Tensor, target: Tensor, pred: Tensor, source_yx: Tensor,
        sizes: list[tuple[int, int]],
    ) -> Tensor:  # fmt: skip
        """`_device_counts` of a multi-label bank, from (N, C, H, W) decisions: per-image (C, 2, 2)
        confusions of hard decisions, positive pixels per class, kept and valid decisions per image;
        a cell counts a pixel as hard when any of its classes is, as observed when any is scored."""
        num_images, num_classes, device = hard_mask.shape[0], self.num_classes, target.device
        tracked = (source_yx[:, 0] >= 0)[:, None]
        valid_mask = ((target == 0) | (target == 1)) & tracked
        hard_mask = hard_mask & valid_mask
        images = torch.arange(num_images, device=device).view(-1, 1, 1, 1)
        classes = torch.arange(num_classes, device=device).view(1, -1, 1, 1)
        index = ((images * num_classes + classes) * 2 + target.clamp(0, 1)) * 2 + pred.long()
        positive = valid_mask & (target == 1)
        parts = [
            _count(index, hard_mask, num_images * num_classes * 4), positive.transpose(0, 1).flatten(1).sum(1),
            hard_mask.flatten(1).sum(1), valid_mask.flatten(1).sum(1),
            *self._cell_counts(hard_mask.any(1), valid_mask.any(1), source_yx=source_yx, sizes=sizes),
            (pixel_loss.float() * hard_mask).flatten(1).sum(1),
        ]  # fmt: skip
        return torch.cat([part.double() for part in parts])

    def _cell_counts(self, hard: Tensor, seen: Tensor, *, source_yx: Tensor,
                     sizes: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:  # fmt: skip
        """Hard and observed pixels (``hard``, ``seen``: (N, H, W) bool) per original-image cell of
        every image, the images' grids concatenated."""
        grids = [(math.ceil(h / self.cell_size), math.ceil(w / self.cell_size)) for h, w in sizes]
        offsets = np.cumsum([0] + [gh * gw for gh, gw in grids])
        geometry = _to_device([[gh, gw, offset] for (gh, gw), offset in zip(grids, offsets, strict=False)],
                              source_yx.device)  # fmt: skip
        grid_h, grid_w, first_cell = (column.view(-1, 1, 1) for column in geometry.unbind(1))
        cells = (source_yx.float() / self.cell_size).floor().long()  # (N, 2, H, W)
        row = torch.minimum(cells[:, 0].clamp(min=0), grid_h - 1)
        col = torch.minimum(cells[:, 1].clamp(min=0), grid_w - 1)
        cell_index = first_cell + row * grid_w + col  # (N, H, W) into the concatenated grids
        num_cells = int(offsets[-1])
        return _count(cell_index, hard, num_cells), _count(cell_index, seen, num_cells)

    def _fold(self, update: _InFlight, *, wait: bool) -> None:
        """Apply one update's counts (see `_device_counts` for their layout) to the statistics."""
        if wait and update.ready is not None:
            update.ready.synchronize()  # the copy of an earlier step: usually long done
        num_images, num_classes = len(update.sample_ids), self.num_classes
        values = update.counts.numpy()
        grids = [(math.ceil(h / self.cell_size), math.ceil(w / self.cell_size)) for h, w in update.sizes]
        grid_sizes = [grid_h * grid_w for grid_h, grid_w in grids]
        pairs = num_classes * 4 if self.multilabel else num_classes**2  # confusion entries per image
        layout = [num_images * pairs, num_classes, num_images, num_images, sum(grid_sizes), sum(grid_sizes)]
        parts = np.split(values[:-num_images].astype(np.int64), np.cumsum(layout)[:-1])
        confusion, class_valid, kept, valid, hard_cells, seen_cells = parts
        confusion = confusion.reshape(num_images, *((num_classes, 2, 2) if self.multilabel else (num_classes,) * 2))
        cell_ends = np.cumsum(grid_sizes)[:-1]
        for i, (hard, seen) in enumerate(zip(np.split(hard_cells, cell_ends), np.split(seen_cells, cell_ends),
                                             strict=True)):  # fmt: skip
            stats = self._get(update.sample_ids[i], *update.sizes[i])
            hard, seen = hard.reshape(grids[i]), seen.reshape(grids[i])
            observed = seen > 0
            stats.hard_acc[observed] = self.momentum * stats.hard_acc[observed] + hard[observed]
            stats.seen_acc[observed] = self.momentum * stats.seen_acc[observed] + seen[observed]
            stats.add_confusion(confusion[i])
            kept_fraction = float(kept[i]) / max(1, int(valid[i]))
            hard_loss = float(values[len(values) - num_images + i]) / max(1, int(kept[i]))
            weight = self.momentum if stats.seen else 0.0
            stats.ema_kept_fraction = weight * stats.ema_kept_fraction + (1 - weight) * kept_fraction
            stats.ema_hard_loss = weight * stats.ema_hard_loss + (1 - weight) * hard_loss
            stats.seen += 1
            stats.last_epoch = update.epoch
        history = self._epochs.setdefault(update.epoch, EpochClassStats.empty(num_classes))
        if self.multilabel:
            history.hard += confusion[:, :, 1].sum(axis=(0, 2))
            missed = confusion[:, :, 1, 0].sum(0)  # hard decisions on pixels of the class, called absent
        else:
            history.hard += confusion.sum(axis=(0, 2))
            missed = confusion.sum(axis=(0, 2)) - np.einsum("ncc->c", confusion)
        history.valid += class_valid
        if history.missed is not None:  # an epoch restored from a bank that did not count it stays unknown
            history.missed += missed

    def state_dict(self) -> dict[str, Any]:
        """A snapshot: its arrays are copies, so later updates leave a saved or pending checkpoint alone."""
        return {
            "num_classes": self.num_classes, "cell_size": self.cell_size, "momentum": self.momentum,
            "multilabel": self.multilabel, "samples": {k: _copied_fields(vars(v)) for k, v in self.samples.items()},
            "epochs": {k: _copied_fields(vars(v)) for k, v in self.epochs.items()},
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take ``state``'s values as copies: updating this bank never changes the dict (or bank) it came from."""
        self.flush()
        self.num_classes, self.cell_size, self.momentum = state["num_classes"], state["cell_size"], state["momentum"]
        self.multilabel = bool(state.get("multilabel", False))  # absent: saved before multi-label banks
        self._samples = {k: SampleStats(**_sparse_fields(_copied_fields(v))) for k, v in state["samples"].items()}
        self._epochs = {int(k): EpochClassStats(**_copied_fields(v)) for k, v in state["epochs"].items()}


def _count(index: Tensor, weight_mask: Tensor, size: int) -> Tensor:
    """(size,) int64 number of True ``weight_mask`` entries per ``index`` value, in [0, size):
    a bincount with a fixed length (``torch.bincount`` on CUDA reads the largest index on the host)."""
    counts = torch.zeros(size, dtype=torch.int64, device=index.device)
    return counts.scatter_add_(0, index.flatten(), weight_mask.flatten().to(torch.int64))


def _send_to_host(counts: Tensor) -> tuple[Tensor, Any]:
    """Start the one device-to-host copy of an update: (host tensor, CUDA event recorded after
    the copy), or (``counts``, None) when they are on the CPU already."""
    if not counts.is_cuda:
        return counts, None
    host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
    host.copy_(counts, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


def _to_device(rows: list[list[int]], device: torch.device) -> Tensor:
    """A small int64 table on ``device`` without a blocking copy (pinned memory on CUDA)."""
    table = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table.to(device)


def _copied_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """A copy of a dataclass's fields with every array copied too."""
    return {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in fields.items()}


def _empty_confusion(num_classes: int) -> dict[str, Any]:
    """`SampleStats`' confusion fields for an image with no hard pixel yet."""
    return {"num_classes": num_classes, "confusion_pairs": np.zeros(0, np.int32),
            "confusion_counts": np.zeros(0, np.int64)}  # fmt: skip


def _sparse_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """A sample's saved fields, with a dense ``confusion`` (a bank saved before it was sparse) made sparse."""
    if "confusion" not in fields:
        return fields
    sparse = confusion_fields(fields.pop("confusion"))
    return {**fields, **sparse}


def confusion_fields(confusion: np.ndarray) -> dict[str, Any]:
    """`SampleStats`' sparse confusion fields holding a dense (C, C) int64 ``confusion``."""
    pairs = np.flatnonzero(confusion)
    counts = np.asarray(confusion, np.int64).ravel()[pairs]
    return {"num_classes": len(confusion), "confusion_pairs": pairs.astype(np.int32), "confusion_counts": counts}


def _class_sums(class_ids: np.ndarray, counts: np.ndarray, num_classes: int) -> np.ndarray:
    """(C,) int64 sums of ``counts`` per class id (exact, unlike a float-weighted bincount)."""
    sums = np.zeros(num_classes, np.int64)
    np.add.at(sums, class_ids, counts)
    return sums
