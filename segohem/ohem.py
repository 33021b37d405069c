"""Pixel-level online hard example mining: choose the hard pixels, then weigh them.

This module imports torch and the standard library only, so `OhemCrossEntropy` can be
copied unchanged into any training loop (Lightning, plain PyTorch, mmseg hooks).

Semantics (stated on purpose; see docs/ohem.md for how they differ from mmseg/HRNet):

* Hardness of a pixel is its unweighted cross-entropy, ``-log p_true``; "probability of the
  true class below ``thresh``" is the same as "loss above ``-log(thresh)``".
* Selection is **per image** by default: what an image keeps does not depend on the batch
  size or on the other images in the batch. ``scope="batch"`` pools the whole local batch,
  as mmseg's ``OHEMPixelSampler`` and HRNet's ``OhemCrossEntropy`` do.
* Ignored pixels are never selected, never counted in k and never in the denominator.
* ``min_kept`` / ``top_k`` are an ``int`` pixel count per image, a ``float`` fraction strictly
  in (0, 1) or a percentage string such as ``"20%"``; ``1.0`` is refused as ambiguous.
* The loss is the mean over kept pixels (class-weighted mean when ``class_weight`` is set).
  Nothing to keep gives a zero loss that is still connected to the graph, never NaN.
* Selection runs under ``no_grad`` on fp32 losses, so mixed precision cannot change which
  pixels are picked. Ties at the k-th value are broken by pixel index (lowest first).
* On the CPU the k-th value is found only where it is needed (``torch.kthvalue``, linear-time
  selection, no sort). On CUDA nothing asks the GPU a question: every row is ranked by one
  stable segmented sort, per-row k is applied on the device, and a bad label trips a
  device-side assert instead of a host-side check; the two paths choose identical pixels.
"""

from __future__ import annotations

import math
import re
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MiningMode = Literal["threshold", "topk", "none"]
MiningScope = Literal["image", "batch"]
MINING_MODES: tuple[str, ...] = ("threshold", "topk", "none")
MINING_SCOPES: tuple[str, ...] = ("image", "batch")
PixelAmount = int | float | str  # see `parse_amount`: 1000 pixels, 0.2 or "20%" of the valid ones


class Selection(NamedTuple):
    """Which pixels were chosen.

    hard_mask: (N, H, W) bool, True where a pixel is kept.
    prob_threshold: (N,) float, the true-class probability at or below which pixels were
        kept in each image: ``thresh`` when the threshold alone kept enough, otherwise the
        probability of the k-th hardest pixel (1.0 for mode ``none``).
    num_kept: (N,) int64 kept pixels per image. num_valid: (N,) int64 valid pixels per image.
    """

    hard_mask: Tensor
    prob_threshold: Tensor
    num_kept: Tensor
    num_valid: Tensor


class OhemResult(NamedTuple):
    """The outcome of one OHEM loss evaluation.

    loss: scalar, mean (class-weighted) cross-entropy over kept pixels.
    hard_mask: (N, H, W) bool, kept pixels.
    pixel_loss: (N, H, W) float32, detached unweighted per-pixel cross-entropy, 0 where ignored.
    num_kept: (N,) int64 kept pixels per image.
    num_valid: (N,) int64 non-ignored pixels per image.
    kept_fraction: (N,) float32, num_kept / num_valid (0 for an image with no valid pixel).
    prob_threshold: (N,) float32, see `Selection`.
    """

    loss: Tensor
    hard_mask: Tensor
    pixel_loss: Tensor
    num_kept: Tensor
    num_valid: Tensor
    kept_fraction: Tensor
    prob_threshold: Tensor


class KeepAmount(NamedTuple):
    """A parsed ``min_kept`` / ``top_k``: exactly one of the two is set.

    pixels: a count of pixels per image. fraction: a share of the valid pixels, in [0, 1].
    """

    pixels: int | None
    fraction: float | None


_PERCENT = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*%\s*")
_AMOUNT_FORMS = "an integer pixel count (1000), a fraction strictly between 0 and 1 (0.2) or a percentage ('20%')"


def parse_amount(amount: PixelAmount, *, name: str = "amount", positive: bool = False) -> KeepAmount:
    """Read ``min_kept`` / ``top_k`` without the count-or-fraction ambiguity of ``1`` vs ``1.0``.

    An ``int`` >= 0 is a pixel count per image; a ``float`` strictly in (0, 1) is a fraction of
    the valid pixels; a string such as ``"20%"`` (0% to 100%) is a percentage of them. A float
    >= 1 or <= 0 is an error that says how to write it. ``positive``: zero pixels is an error.
    """
    if isinstance(amount, bool):
        raise ValueError(f"{name}={amount!r}: write {_AMOUNT_FORMS}")
    if isinstance(amount, int):
        if amount < (1 if positive else 0):
            raise ValueError(f"{name}={amount}: a pixel count must be >= {1 if positive else 0}")
        return KeepAmount(amount, None)
    if isinstance(amount, float):
        if 0.0 < amount < 1.0:
            return KeepAmount(None, amount)
        raise ValueError(f"{name}={amount!r}: {_float_advice(amount, positive=positive)}")
    if isinstance(amount, str):
        match = _PERCENT.fullmatch(amount)
        percent = float(match.group(1)) if match else math.nan
        above_lowest = percent > 0.0 if positive else percent >= 0.0  # False for NaN (no match)
        if not (above_lowest and percent <= 100.0):
            lowest = "above 0%" if positive else "from 0%"
            raise ValueError(
                f"{name}={amount!r}: a percentage is {lowest} to 100%, like '20%'; or write {_AMOUNT_FORMS}"
            )
        return KeepAmount(None, percent / 100.0)
    raise ValueError(f"{name}={amount!r} ({type(amount).__name__}): write {_AMOUNT_FORMS}")


def _float_advice(amount: float, *, positive: bool) -> str:
    """What to write instead of a float that is not a fraction strictly between 0 and 1."""
    if amount >= 1.0 and amount.is_integer():
        return (
            f"a float is a fraction strictly between 0 and 1, so {amount!r} is ambiguous; write '100%' "
            f"to keep every valid pixel, or the integer {int(amount)} for a count of pixels"
        )
    if amount == 0.0 and not positive:
        return "a float is a fraction strictly between 0 and 1; write 0 for no pixels"
    return f"a float is a fraction strictly between 0 and 1; write {_AMOUNT_FORMS}"


def _fraction_count(fraction: float, num_valid: Tensor) -> Tensor:
    """(R,) int64 ``ceil(fraction * num_valid)``: a share of each row's valid pixels, rounded up."""
    return torch.ceil(num_valid.to(torch.float64) * fraction).to(torch.int64)


def resolve_count(
    amount: PixelAmount, num_valid: Tensor, *, per_row_images: int = 1, name: str = "amount", positive: bool = False
) -> Tensor:
    """Turn a pixel count, fraction or percentage (see `parse_amount`) into a per-row pixel count
    clamped to ``[0, num_valid]``.

    A count is per image (multiplied by ``per_row_images`` when a row pools several images); a
    fraction or percentage applies to the row's valid pixels, rounded up.
    num_valid: (R,) int64 valid pixels per row. Returns (R,) int64.
    """
    pixels, fraction = parse_amount(amount, name=name, positive=positive)
    if fraction is not None:
        counts = _fraction_count(fraction, num_valid)
    else:
        counts = torch.full_like(num_valid, (pixels or 0) * per_row_images)
    return torch.minimum(counts, num_valid)


def _topk_rows(row_loss: Tensor, num_keep: Tensor, *, by_sort: bool | None = None) -> tuple[Tensor, Tensor]:
    """Mask of the ``num_keep[r]`` largest entries of each row, ties broken by lowest index.

    row_loss: (R, P) float, ignored entries already -inf. num_keep: (R,) int64 with
    1 <= num_keep <= the row's valid entries. Returns (mask (R, P) bool, kth_loss (R,)).
    by_sort: rank the rows with one stable segmented sort instead of ``kthvalue``; the default
    (None) does so on CUDA, where ``kthvalue`` works through each long row in a single thread
    block and a sort is several times faster. Both give identical results.
    """
    if by_sort if by_sort is not None else row_loss.is_cuda:
        return _topk_rows_by_sort(row_loss, num_keep)
    num_pixels = row_loss.shape[1]
    kth_loss = torch.empty(len(row_loss), dtype=row_loss.dtype, device=row_loss.device)
    # Rows sharing one k go through a single batched kthvalue (parallel over rows):
    # the k-th largest is the (P - k + 1)-th smallest; linear-time selection, no sort.
    for k in num_keep.unique().tolist():  # host sync: usually one distinct k
        same_k = (num_keep == k).nonzero().flatten()
        rows = row_loss if len(same_k) == len(row_loss) else row_loss[same_k]
        kth_loss[same_k] = torch.kthvalue(rows, num_pixels - k + 1, dim=1).values
    mask = row_loss >= kth_loss[:, None]
    num_at_least = mask.sum(1)
    surplus = (num_at_least != num_keep).nonzero().flatten()
    if len(surplus):  # host sync; ties at the k-th value (saturated losses): keep lowest indices
        ties = row_loss[surplus] == kth_loss[surplus, None]  # (S, P)
        num_ties = ties.sum(1)
        ties_allowed = num_keep[surplus] - (num_at_least[surplus] - num_ties)
        tie_row, tie_col = ties.nonzero(as_tuple=True)  # row-major: ascending index per row
        rank_in_row = torch.arange(len(tie_row), device=ties.device) - (num_ties.cumsum(0) - num_ties)[tie_row]
        drop = rank_in_row >= ties_allowed[tie_row]
        mask[surplus[tie_row[drop]], tie_col[drop]] = False
    return mask, kth_loss


def _topk_rows_by_sort(row_loss: Tensor, num_keep: Tensor) -> tuple[Tensor, Tensor]:
    """`_topk_rows` through a stable descending sort: equal losses keep index order.

    No host synchronisation and no data-dependent shape. ``num_keep`` may be 0 here: that row's
    mask is empty and its kth_loss is the row's largest loss (callers discard it).
    """
    sorted_loss, order = torch.sort(row_loss, dim=1, descending=True, stable=True)
    positions = torch.arange(row_loss.shape[1], device=row_loss.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    kth_loss = sorted_loss.gather(1, (num_keep - 1).clamp(min=0)[:, None]).squeeze(1)
    return rank < num_keep[:, None], kth_loss


def _sync_free(tensor: Tensor) -> bool:
    """Whether to select without host synchronisations: on CUDA, where each one stalls the queue.
    The CPU keeps the host-driven path, which ranks only the rows that need it (tests patch this
    to run the CUDA path on the CPU)."""
    return tensor.is_cuda


class _RowSelection(NamedTuple):
    hard: Tensor  # (R, P) bool
    row_threshold: Tensor  # (R,) float32
    num_kept: Tensor  # (R,) int64


def _select_rows_on_device(row_loss: Tensor, num_keep: Tensor, *, mode: str, thresh: float) -> _RowSelection:
    """Threshold or top-k selection of each row with no host sync: every row is ranked, and
    whether a row takes its ranking is decided on the device (`torch.where`, fixed shapes).

    row_loss: (R, P) float32, ignored entries -inf. num_keep: (R,) int64 in [0, valid entries].
    """
    topk_mask, kth_loss = _topk_rows_by_sort(row_loss, num_keep)
    kth_threshold = torch.exp(-kth_loss).clamp(max=1.0)
    if mode == "threshold":
        above = row_loss > -math.log(thresh)
        num_above = above.sum(1)
        short = num_above < num_keep  # (R,) too few pass the threshold: the num_keep hardest instead
        return _RowSelection(
            torch.where(short[:, None], topk_mask, above),
            torch.where(short, kth_threshold, thresh),
            torch.where(short, num_keep, num_above),
        )
    return _RowSelection(topk_mask, torch.where(num_keep > 0, kth_threshold, 1.0), num_keep)


def _select_rows_on_host(row_loss: Tensor, num_keep: Tensor, *, mode: str, thresh: float) -> _RowSelection:
    """`_select_rows_on_device` with host decisions: only rows short of ``num_keep`` are ranked,
    rows sharing one k in one batched ``kthvalue`` (the faster way on the CPU)."""
    num_rows = len(row_loss)
    row_threshold = torch.ones(num_rows, device=row_loss.device)
    if mode == "threshold":
        hard = row_loss > -math.log(thresh)
        row_threshold.fill_(thresh)
        num_kept = hard.sum(1)
        short_rows = (num_kept < num_keep).nonzero().flatten()
    else:
        hard = torch.zeros_like(row_loss, dtype=torch.bool)
        num_kept = torch.zeros_like(num_keep)
        short_rows = (num_keep > 0).nonzero().flatten()
    if len(short_rows) == num_rows:  # host sync: the k-th value only where needed
        hard, kth_loss = _topk_rows(row_loss, num_keep)
        row_threshold, num_kept = torch.exp(-kth_loss).clamp(max=1.0), num_keep
    elif len(short_rows):
        hard[short_rows], kth_loss = _topk_rows(row_loss[short_rows], num_keep[short_rows])
        row_threshold[short_rows] = torch.exp(-kth_loss).clamp(max=1.0)
        num_kept[short_rows] = num_keep[short_rows]
    return _RowSelection(hard, row_threshold, num_kept)


def select_hard_pixels(
    pixel_loss: Tensor,
    valid_mask: Tensor,
    *,
    mode: MiningMode = "threshold",
    thresh: float = 0.7,
    min_kept: PixelAmount = 0,
    top_k: PixelAmount = 0.2,
    scope: MiningScope = "image",
    keep_floor: float = 0.0,
) -> Selection:
    """Choose hard pixels; pure function, no gradients.

    pixel_loss: (N, H, W) unweighted cross-entropy ``-log p_true`` (any float dtype; compared
        in fp32). valid_mask: (N, H, W) bool, False at ignored pixels.
    mode: ``threshold`` keeps pixels with ``p_true < thresh``; if fewer than ``min_kept``
        qualify, the ``min_kept`` hardest instead. ``topk`` keeps the ``top_k`` hardest.
        ``none`` keeps every valid pixel.
    min_kept / top_k: an ``int`` is pixels per image, a ``float`` in (0, 1) or a string such as
        ``"20%"`` is a share of the valid pixels (see `parse_amount`); ``top_k`` must be > 0.
    scope: ``image`` selects in each image on its own; ``batch`` pools the batch (counts are
        then multiplied by N, fractions apply to the batch's valid pixels).
    keep_floor: fraction of valid pixels kept at least (the warm-up ramp; 0 disables it).
    """
    if mode not in MINING_MODES:
        raise ValueError(f"unknown mining mode {mode!r}; valid modes: {', '.join(MINING_MODES)}")
    if scope not in MINING_SCOPES:
        raise ValueError(f"unknown mining scope {scope!r}; valid: {', '.join(MINING_SCOPES)}")
    if not 0.0 < thresh <= 1.0:
        raise ValueError(f"thresh is a probability in (0, 1], got {thresh!r}")
    parse_amount(min_kept, name="min_kept")  # both validated whatever the mode: fail early
    parse_amount(top_k, name="top_k", positive=True)
    num_images = pixel_loss.shape[0]
    num_rows = num_images if scope == "image" else 1
    with torch.no_grad():
        row_valid = valid_mask.reshape(num_rows, -1)  # (R, P)
        num_valid = row_valid.sum(1)  # (R,)
        if mode == "none":
            rows = _RowSelection(row_valid, torch.ones(num_rows, device=pixel_loss.device), num_valid)
        else:
            floor = _fraction_count(min(max(keep_floor, 0.0), 1.0), num_valid)
            target = min_kept if mode == "threshold" else top_k
            per_row = num_images if scope == "batch" else 1
            num_keep = torch.maximum(resolve_count(target, num_valid, per_row_images=per_row), floor)
            row_loss = pixel_loss.detach().float().reshape(num_rows, -1)
            row_loss = row_loss.masked_fill(~row_valid, -math.inf)
            select_rows = _select_rows_on_device if _sync_free(row_loss) else _select_rows_on_host
            rows = select_rows(row_loss, num_keep, mode=mode, thresh=thresh)
        hard, row_threshold, num_kept = rows
        if scope == "batch":
            row_threshold = row_threshold.expand(num_images)
            num_kept = hard.reshape(num_images, -1).sum(1)
            num_valid = valid_mask.reshape(num_images, -1).sum(1)
        return Selection(hard.reshape(valid_mask.shape), row_threshold.clone(), num_kept, num_valid)


def class_quota_mask(
    pixel_loss: Tensor, target: Tensor, valid_mask: Tensor, *, num_classes: int, amount: PixelAmount
) -> Tensor:
    """Per image, the ``amount`` hardest pixels of every class present; pure function, no gradients.

    A class quota (``ohem.class_min_kept``) is added to a selection so that large confusions
    (tree / building, road / sidewalk) cannot take every kept place from a thin class: in each
    image, each class present keeps at least ``amount`` of its own hardest pixels. ``amount``
    is a count per class and image, or a fraction or percentage of that class's valid pixels in
    the image (rounded up); see `parse_amount`. Ties are broken by pixel index (lowest first).

    pixel_loss: (N, H, W) float. target: (N, H, W) int64 in [0, C) where ``valid_mask``.
    Returns (N, H, W) bool. No host synchronisation: two stable sorts rank every pixel within
    its (image, class) group.
    """
    pixels, fraction = parse_amount(amount, name="class_min_kept")
    num_images = pixel_loss.shape[0]
    bad = valid_mask & ((target < 0) | (target >= num_classes))
    if _sync_free(target):
        torch._assert_async(~bad.any(), "class_quota_mask: labels outside [0, num_classes)")
    elif bool(bad.any()):
        raise ValueError(f"class_quota_mask: label values {sorted(set(target[bad].tolist()))[:10]} are outside "
                         f"[0, {num_classes}) where valid_mask is True")  # fmt: skip
    with torch.no_grad():
        loss = pixel_loss.detach().float().reshape(num_images, -1)
        valid = valid_mask.reshape(num_images, -1)
        # ignored pixels form an extra group C, which keeps nothing
        group = torch.where(valid, target.reshape(num_images, -1), num_classes).long()
        by_loss = torch.sort(loss, dim=1, descending=True, stable=True).indices  # hardest first, ties by index
        by_group = torch.sort(group.gather(1, by_loss), dim=1, stable=True).indices  # grouped, order kept
        order = by_loss.gather(1, by_group)  # (N, P) pixel indices by (class, hardest first)
        sorted_group = group.gather(1, order)
        sizes = torch.zeros(num_images, num_classes + 1, dtype=torch.int64, device=loss.device)
        sizes.scatter_add_(1, group, torch.ones_like(group))
        starts = sizes.cumsum(1) - sizes
        rank = torch.arange(loss.shape[1], device=loss.device) - starts.gather(1, sorted_group)
        if fraction is not None:
            quota = _fraction_count(fraction, sizes)
        else:
            quota = torch.minimum(torch.full_like(sizes, pixels or 0), sizes)
        quota[:, num_classes] = 0
        keep_sorted = rank < quota.gather(1, sorted_group)
        keep = torch.zeros_like(valid).scatter_(1, order, keep_sorted)
        return keep.reshape(valid_mask.shape)


def keep_floor_at(step: int | None, warmup_steps: int) -> float:
    """Warm-up ramp: fraction of valid pixels kept at least at ``step``.

    Falls linearly from 1.0 (plain cross-entropy) at step 0 to 0.0 at ``warmup_steps``, after
    which only the mining rule applies (TF DeepLab's ``hard_example_mining_step``).
    """
    if step is None or warmup_steps <= 0:
        return 0.0
    return max(0.0, 1.0 - step / warmup_steps)


class OhemCrossEntropy(nn.Module):
    """Cross-entropy over the hard pixels chosen by `select_hard_pixels`.

    forward(logits (N, C, H, W), target (N, H, W) int64, step=None) -> OhemResult.
    ``min_kept`` / ``top_k``: 1000 (pixels per image), 0.2 or ``"20%"`` (of the valid pixels);
    ``"100%"`` keeps every valid pixel. ``class_min_kept`` adds a per-class quota to the
    selection (see `class_quota_mask`; 0 disables it). ``weight_by_prediction``: with class weights,
    a kept pixel weighs max(weight of its label, weight of its argmax class). Labels outside
    ``[0, C)`` that are not ``ignore_index`` raise ``ValueError`` naming them (mmseg #1180 turned
    these into opaque CUDA index errors).
    """

    def __init__(
        self,
        *,
        mode: MiningMode = "threshold",
        thresh: float = 0.7,
        min_kept: PixelAmount = 0.1,
        top_k: PixelAmount = 0.2,
        scope: MiningScope = "image",
        ignore_index: int = 255,
        class_weight: list[float] | Tensor | None = None,
        warmup_steps: int = 0,
        class_min_kept: PixelAmount = 0,
        weight_by_prediction: bool = False,
    ) -> None:
        super().__init__()
        # Validate eagerly so a bad config fails at construction, not mid-epoch.
        select_hard_pixels(
            torch.zeros(1, 1, 1), torch.ones(1, 1, 1, dtype=torch.bool),
            mode=mode, thresh=thresh, min_kept=min_kept, top_k=top_k, scope=scope,
        )  # fmt: skip
        self.mode, self.thresh, self.scope = mode, thresh, scope
        self.min_kept, self.top_k = min_kept, top_k
        self.ignore_index, self.warmup_steps = ignore_index, warmup_steps
        self.weight_by_prediction = weight_by_prediction
        quota = parse_amount(class_min_kept, name="class_min_kept")
        self.class_min_kept = class_min_kept if (quota.pixels or quota.fraction) and mode != "none" else 0
        self.class_weight: Tensor | None
        weight = None if class_weight is None else torch.as_tensor(class_weight, dtype=torch.float32)
        self.register_buffer("class_weight", weight, persistent=False)
        self.base_class_weight = None if weight is None else weight.clone()  # what `scale_class_weight` scales

    def scale_class_weight(self, factor: Tensor | None) -> None:
        """Class weights = the constructor's ``class_weight`` (1 where none) x ``factor`` ((C,),
        e.g. recall weights from the dictionary); None restores the constructor's weights."""
        base = self.base_class_weight
        device = self.class_weight.device if self.class_weight is not None else None  # None: where factor is
        if factor is None:
            self.class_weight = None if base is None else base.to(device)
            return
        factor = torch.as_tensor(factor, dtype=torch.float32, device=device)
        self.class_weight = factor.clone() if base is None else base.to(factor.device) * factor

    def _check_labels(self, target: Tensor, valid_mask: Tensor, *, num_classes: int) -> None:
        """Refuse labels outside ``[0, C)`` that are not ``ignore_index`` (mmseg #1180)."""
        bad_mask = valid_mask & ((target < 0) | (target >= num_classes))
        where = f"outside [0, {num_classes}) and are not the ignore_index {self.ignore_index}"
        if _sync_free(target):
            # No host sync on CUDA: a device-side assert, raised at the next synchronisation;
            # the same batch on the CPU names the values.
            torch._assert_async(~bad_mask.any(), f"OhemCrossEntropy: label values {where}")
        elif bool(bad_mask.any()):  # host sync (CPU only): names the bad values
            bad = sorted(set(target[bad_mask].unique().tolist()))
            raise ValueError(f"label values {bad[:10]} are {where}")

    def forward(
        self, logits: Tensor, target: Tensor, *, step: int | None = None, pixel_weight: Tensor | None = None
    ) -> OhemResult:
        """logits (N, C, H, W), target (N, H, W); ``pixel_weight`` (N, H, W) >= 0 optionally
        re-weights kept pixels (selection is unchanged); ``step`` drives the warm-up ramp."""
        if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
            raise ValueError(
                f"expected logits (N, C, H, W) and target (N, H, W) of the same N, H, W; got "
                f"{tuple(logits.shape)} and {tuple(target.shape)} (upsample logits to the label size)"
            )
        num_classes = logits.shape[1]
        valid_mask = target != self.ignore_index  # (N, H, W)
        self._check_labels(target, valid_mask, num_classes=num_classes)
        # fp32 so that autocast cannot change the ranking of pixels.
        pixel_loss = F.cross_entropy(
            logits.float(), target, ignore_index=self.ignore_index, reduction="none"
        )  # (N, H, W)
        selection = select_hard_pixels(
            pixel_loss, valid_mask, mode=self.mode, thresh=self.thresh, min_kept=self.min_kept,
            top_k=self.top_k, scope=self.scope, keep_floor=keep_floor_at(step, self.warmup_steps),
        )  # fmt: skip
        hard_mask, num_kept, num_valid = selection.hard_mask, selection.num_kept, selection.num_valid
        if self.class_min_kept:
            hard_mask = hard_mask | class_quota_mask(
                pixel_loss, target, valid_mask, num_classes=num_classes, amount=self.class_min_kept
            )
            num_kept = hard_mask.reshape(len(hard_mask), -1).sum(1)
        if self.class_weight is None and pixel_weight is None:
            weight = hard_mask.to(pixel_loss.dtype)
            denominator = num_kept.sum().to(pixel_loss.dtype)
        else:
            weight = hard_mask.to(pixel_loss.dtype)
            if self.class_weight is not None:
                class_weight = self.class_weight[target.clamp(0, num_classes - 1)]
                if self.weight_by_prediction:  # a false positive of a heavy class weighs as much as a miss
                    class_weight = torch.maximum(class_weight, self.class_weight[logits.detach().argmax(1)])
                weight = weight * class_weight
            if pixel_weight is not None:
                weight = weight * pixel_weight.to(pixel_loss.dtype)
            denominator = weight.sum()
        # Nothing kept: the numerator is an exact 0 still attached to the logits (never NaN,
        # and DDP's backward does not hang on a missing graph).
        loss = (pixel_loss * weight).sum() / torch.where(denominator > 0, denominator, 1.0)
        kept_fraction = num_kept.float() / num_valid.clamp(min=1).float()
        return OhemResult(
            loss, hard_mask, pixel_loss.detach(), num_kept, num_valid, kept_fraction,
            selection.prob_threshold,
        )  # fmt: skip


class OhemBinaryCrossEntropy(nn.Module):
    """Binary and multi-label OHEM: a sigmoid per pixel and class, hard positives and hard
    negatives chosen separately (the detection OHEM's foreground : background ratio).

    forward(logits (N, K, H, W), target (N, K, H, W) of 0 / 1 / ``ignore_index``) -> OhemResult
    whose masks and losses are (N, K, H, W); K = 1 is a binary task, K > 1 multi-label (classes
    may overlap). In each image and class channel:

    * positives (target 1): mode ``topk`` keeps the ``top_k`` hardest (a count, or a share of the
      channel's positives); ``threshold`` keeps those with ``p < thresh``, at least ``min_kept``
      of them; ``none`` keeps all (plain binary cross-entropy).
    * negatives (target 0): the ``neg_ratio`` x (kept positives) hardest, and at least
      ``min_neg`` (count or share of the negatives), so a channel without positives still
      learns what is not there; ``none`` keeps all.

    The loss is the mean binary cross-entropy over kept entries. Selection is fp32, under
    ``no_grad``, ties by lowest index; on CUDA without host synchronisations.
    """

    def __init__(
        self, *, mode: MiningMode = "topk", thresh: float = 0.7, min_kept: PixelAmount = 0.1,
        top_k: PixelAmount = 0.2, neg_ratio: float = 3.0, min_neg: PixelAmount = 0.01, ignore_index: int = 255,
    ) -> None:  # fmt: skip
        super().__init__()
        if mode not in MINING_MODES:
            raise ValueError(f"unknown mining mode {mode!r}; valid modes: {', '.join(MINING_MODES)}")
        if not 0.0 < thresh <= 1.0:
            raise ValueError(f"thresh is a probability in (0, 1], got {thresh!r}")
        if not neg_ratio >= 0.0:
            raise ValueError(f"neg_ratio is negatives per kept positive, >= 0; got {neg_ratio!r}")
        parse_amount(min_kept, name="min_kept")
        parse_amount(top_k, name="top_k", positive=True)
        parse_amount(min_neg, name="min_neg")
        self.mode, self.thresh, self.min_kept, self.top_k = mode, thresh, min_kept, top_k
        self.neg_ratio, self.min_neg, self.ignore_index = neg_ratio, min_neg, ignore_index

    def select(self, pixel_loss: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(kept (N, K, H, W) bool, positive rows' probability threshold (N*K,), kept positives
        (N*K,)) for per-element losses ``pixel_loss`` and 0 / 1 / ignore ``target``."""
        rows = pixel_loss.shape[0] * pixel_loss.shape[1]
        loss = pixel_loss.detach().float().reshape(rows, -1)
        flat = target.reshape(rows, -1)
        positive, negative = flat == 1, flat == 0
        if self.mode == "none":
            return (positive | negative).reshape(target.shape), torch.ones(rows, device=loss.device), positive.sum(1)
        select_rows = _select_rows_on_device if _sync_free(loss) else _select_rows_on_host
        num_pos, num_neg = positive.sum(1), negative.sum(1)
        target_amount = self.top_k if self.mode == "topk" else self.min_kept
        pos = select_rows(loss.masked_fill(~positive, -math.inf), resolve_count(target_amount, num_pos),
                          mode=self.mode, thresh=self.thresh)  # fmt: skip
        by_ratio = torch.ceil(pos.num_kept.double() * self.neg_ratio).long()
        num_keep_neg = torch.minimum(torch.maximum(by_ratio, resolve_count(self.min_neg, num_neg)), num_neg)
        neg = select_rows(loss.masked_fill(~negative, -math.inf), num_keep_neg, mode="topk", thresh=self.thresh)
        kept = (pos.hard & positive) | (neg.hard & negative)
        return kept.reshape(target.shape), pos.row_threshold, pos.num_kept

    def forward(self, logits: Tensor, target: Tensor, *, step: int | None = None,
                pixel_weight: Tensor | None = None) -> OhemResult:  # fmt: skip
        """logits and target (N, K, H, W); ``pixel_weight`` (N, K, H, W) or (N, H, W) re-weights
        kept entries. ``step`` is accepted for the trainer and unused."""
        if logits.ndim != 4 or target.shape != logits.shape:
            raise ValueError(
                f"expected logits and target of one shape (N, K, H, W); got {tuple(logits.shape)} and "
                f"{tuple(target.shape)} (a binary task has K = 1)"
            )
        bad = (target != 0) & (target != 1) & (target != self.ignore_index)
        if _sync_free(target):
            torch._assert_async(~bad.any(), "OhemBinaryCrossEntropy: targets are 0, 1 or the ignore_index")
        elif bool(bad.any()):
            raise ValueError(
                f"target values {sorted(set(target[bad].unique().tolist()))[:10]} are not 0, 1 or the "
                f"ignore_index {self.ignore_index}"
            )
        valid = target != self.ignore_index
        pixel_loss = F.binary_cross_entropy_with_logits(
            logits.float(), torch.where(valid, target, 0).float(), reduction="none"
        ).masked_fill(~valid, 0.0)
        with torch.no_grad():
            kept, row_threshold, _ = self.select(pixel_loss, target)
        weight = kept.to(pixel_loss.dtype)
        if pixel_weight is not None:
            weight = weight * (pixel_weight[:, None] if pixel_weight.ndim == 3 else pixel_weight).to(weight.dtype)
        denominator = weight.sum()
        loss = (pixel_loss * weight).sum() / torch.where(denominator > 0, denominator, 1.0)
        num_images = logits.shape[0]
        num_kept = kept.reshape(num_images, -1).sum(1)
        num_valid = valid.reshape(num_images, -1).sum(1)
        return OhemResult(
            loss, kept, pixel_loss.detach(), num_kept, num_valid,
            num_kept.float() / num_valid.clamp(min=1).float(), row_threshold.reshape(num_images, -1).mean(1),
        )  # fmt: skip


class TwoClassAsBinary(nn.Module):
    """`OhemBinaryCrossEntropy` for a two-class model (background 0, foreground 1).

    A softmax over logits (l0, l1) is a sigmoid of z = l1 - l0, so the model, evaluation and
    the dictionary stay two-class while positives (label 1) and negatives (label 0) are mined
    separately. forward(logits (N, 2, H, W), target (N, H, W)) -> OhemResult of (N, H, W).
    """

    def __init__(self, binary: OhemBinaryCrossEntropy) -> None:
        super().__init__()
        self.binary = binary

    @property
    def ignore_index(self) -> int:
        return self.binary.ignore_index

    def forward(self, logits: Tensor, target: Tensor, *, step: int | None = None,
                pixel_weight: Tensor | None = None) -> OhemResult:  # fmt: skip
        if logits.ndim != 4 or logits.shape[1] != 2:
            raise ValueError(f"expected two-class logits (N, 2, H, W), got {tuple(logits.shape)}")
        z = logits[:, 1:2] - logits[:, 0:1]
        result = self.binary(z, target[:, None], pixel_weight=pixel_weight)
        return result._replace(hard_mask=result.hard_mask[:, 0], pixel_loss=result.pixel_loss[:, 0])


def unpack_labels(target: Tensor, *, num_classes: int, ignore_index: int) -> Tensor:
    """Bit-packed multi-label masks (N, H, W), bit k set = class k present, as (N, K, H, W) of 0 / 1,
    ``ignore_index`` in every class where the packed value is the ignore id.

    A value setting a bit at or above ``num_classes`` raises ValueError (CPU) or fails a device-side
    assert (CUDA), as a class id out of range does for cross-entropy.
    """
    ignored = target == ignore_index
    bad = ((target >> num_classes) != 0) & ~ignored
    if _sync_free(target):
        torch._assert_async(~bad.any(), "unpack_labels: label values set bits beyond num_classes")
    elif bool(bad.any()):
        raise ValueError(
            f"multi-label values {sorted(set(target[bad].unique().tolist()))[:10]} set bits beyond the "
            f"{num_classes} classes (values 0..{2**num_classes - 1}) and are not the ignore_index {ignore_index}"
        )
    bits = torch.arange(num_classes, device=target.device).view(1, -1, 1, 1)
    unpacked = (target[:, None].long() >> bits) & 1
    return unpacked.masked_fill(ignored[:, None], ignore_index)


class PackedMultiLabel(nn.Module):
    """`OhemBinaryCrossEntropy` for bit-packed multi-label masks: a K-channel model, a sigmoid per class.

    forward(logits (N, K, H, W), target (N, H, W) packed as `unpack_labels` reads it) -> OhemResult
    of (N, K, H, W): each image and class mines its hard positives and hard negatives apart.
    """

    def __init__(self, binary: OhemBinaryCrossEntropy, *, num_classes: int) -> None:
        super().__init__()
        self.binary, self.num_classes = binary, num_classes

    @property
    def ignore_index(self) -> int:
        return self.binary.ignore_index

    def unpack(self, target: Tensor) -> Tensor:
        """(N, K, H, W) 0 / 1 / ignore of packed ``target`` (N, H, W)."""
        return unpack_labels(target, num_classes=self.num_classes, ignore_index=self.ignore_index)

    def forward(self, logits: Tensor, target: Tensor, *, step: int | None = None,
                pixel_weight: Tensor | None = None) -> OhemResult:  # fmt: skip
        if logits.ndim != 4 or logits.shape[1] != self.num_classes:
            raise ValueError(f"expected logits (N, {self.num_classes}, H, W), got {tuple(logits.shape)}")
        return self.binary(logits, self.unpack(target), pixel_weight=pixel_weight)
