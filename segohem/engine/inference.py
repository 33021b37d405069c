"""Logits for every evaluation-like pass (validation, eval, predict, mine, panels): whole-image or
sliding-window inference with optional flip and multi-scale test-time augmentation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from segohem.config import DataConfig, EvalConfig


def slide_windows(height: int, width: int, *, crop: tuple[int, int], stride: tuple[int, int]) -> list[tuple[int, int]]:
    """(top, left) of every ``crop`` window over a ``height`` x ``width`` image (each at least the crop).

    As mmseg's ``slide_inference``: a window every ``stride``, the last one of each row and
    column moved back to end at the image border, so every pixel is covered when stride <= crop.
    """

    def starts(size: int, window: int, step: int) -> list[int]:
        num_windows = max(size - window + step - 1, 0) // step + 1
        return [min(i * step, size - window) for i in range(num_windows)]

    return [(top, left) for top in starts(height, crop[0], stride[0]) for left in starts(width, crop[1], stride[1])]


def window_counts(height: int, width: int, *, crop: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
    """(height, width) float32: how many windows of `slide_windows` cover each pixel."""
    counts = torch.zeros(height, width)
    for top, left in slide_windows(height, width, crop=crop, stride=stride):
        counts[top : top + crop[0], left : left + crop[1]] += 1
    return counts


def _forward(model: nn.Module, images: torch.Tensor, *, num_classes: int, size_divisor: int) -> torch.Tensor:
    """(N, 3, H, W) -> (N, C, H, W) float32: zero-padded bottom/right to a multiple of ``size_divisor``
    (the eval transform's padding) for the model, logits resized to the input if the model
    returns another size, then the padding cropped off."""
    height, width = images.shape[-2:]
    pad_bottom, pad_right = -height % size_divisor, -width % size_divisor
    if pad_bottom or pad_right:
        images = F.pad(images, (0, pad_right, 0, pad_bottom))
    logits = model(images).float()
    if logits.ndim != 4 or logits.shape[1] != num_classes:
        raise ValueError(f"the model returned logits of shape {tuple(logits.shape)}; expected (N, {num_classes}, H, W)")
    if logits.shape[-2:] != images.shape[-2:]:
        logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return logits[:, :, :height, :width]


def _slide(
    model: nn.Module, images: torch.Tensor, *, num_classes: int, crop: tuple[int, int], stride: tuple[int, int],
    batch_windows: int, size_divisor: int,
) -> torch.Tensor:  # fmt: skip
    """(N, 3, H, W) -> (N, C, H, W) float32: each pixel's logits summed over the windows covering
    it, divided by their number. An image smaller than the crop is zero-padded to it first."""
    num_images, _, height, width = images.shape
    padded_height, padded_width = max(height, crop[0]), max(width, crop[1])
    images = F.pad(images, (0, padded_width - width, 0, padded_height - height))
    logit_sum = images.new_zeros((num_images, num_classes, padded_height, padded_width), dtype=torch.float32)
    windows = [
        (index, top, left)
        for index in range(num_images)
        for top, left in slide_windows(padded_height, padded_width, crop=crop, stride=stride)
    ]
    for start in range(0, len(windows), batch_windows):
        chunk = windows[start : start + batch_windows]
        window_images = torch.stack(
            [images[index, :, top : top + crop[0], left : left + crop[1]] for index, top, left in chunk]
        )  # (B, 3, crop H, crop W)
        window_logits = _forward(model, window_images, num_classes=num_classes, size_divisor=size_divisor)
        for (index, top, left), logits in zip(chunk, window_logits, strict=True):
            logit_sum[index, :, top : top + crop[0], left : left + crop[1]] += logits
    counts = window_counts(padded_height, padded_width, crop=crop, stride=stride).to(logit_sum.device)
    return (logit_sum / counts)[:, :, :height, :width]


@torch.no_grad()
def infer_logits(
    model: nn.Module,
    images: torch.Tensor,
    *,
    num_classes: int,
    mode: Literal["whole", "slide"] = "whole",
    crop: Sequence[int] = (),
    stride: Sequence[int] = (),
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
    batch_windows: int = 1,
    size_divisor: int = 1,
    multilabel: bool = False,
) -> torch.Tensor:
    """Logits of ``model`` for ``images`` (N, 3, H, W), normalized: (N, ``num_classes``, H, W) float32.

    ``whole``: one forward pass per image batch. ``slide``: windows of ``crop`` (H, W) every
    ``stride`` (H, W), the last aligned to the image border (`slide_windows`); each pixel gets
    the mean of the logits of the windows covering it; an image smaller than the crop is
    zero-padded and the padding dropped; ``batch_windows`` windows (of all images) per forward.
    Every model input is zero-padded bottom/right to a multiple of ``size_divisor`` (as the
    eval transform pads) and the padding cropped from its logits.

    Test-time augmentation: each scale in ``scales`` resizes the image (bilinear), and with
    ``flip`` its horizontal mirror is inferred too (flipped back); every view's logits are
    resized back to (H, W). One view returns its logits. Several views return the log of their
    mean softmax, so ``softmax`` of the result is the averaged probability and argmax and
    cross-entropy treat it as logits. Probabilities are averaged rather than logits because
    each view is a prediction in its own right: a view with large logits (e.g. an upscaled,
    overconfident one) would dominate a logit mean, while probabilities are bounded; mmseg's
    test-time augmentation averages probabilities the same way. ``multilabel``: a sigmoid per
    class, so several views return the logit of their mean sigmoid.
    """
    if mode == "slide" and (len(crop) != 2 or len(stride) != 2):
        raise ValueError(f"slide inference needs crop and stride as (H, W); got crop={crop}, stride={stride}")
    height, width = images.shape[-2:]
    views = [(scale, mirrored) for scale in scales for mirrored in ((False, True) if flip else (False,))]
    prob_sum: torch.Tensor | None = None
    for scale, mirrored in views:
        view = images.flip(-1) if mirrored else images
        if scale != 1.0:
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            view = F.interpolate(view, size=size, mode="bilinear", align_corners=False)
        if mode == "slide":
            logits = _slide(model, view, num_classes=num_classes, crop=(crop[0], crop[1]),
                            stride=(stride[0], stride[1]), batch_windows=batch_windows,
                            size_divisor=size_divisor)  # fmt: skip
        else:
            logits = _forward(model, view, num_classes=num_classes, size_divisor=size_divisor)
        if scale != 1.0:
            logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        if mirrored:
            logits = logits.flip(-1)
        if len(views) == 1:
            return logits
        probs = logits.sigmoid() if multilabel else logits.softmax(1)
        prob_sum = probs if prob_sum is None else prob_sum.add_(probs)
    assert prob_sum is not None
    if multilabel:
        return torch.logit(prob_sum / len(views), eps=1e-7)
    # The floor keeps a probability that underflowed to 0 from becoming an infinite loss.
    return (prob_sum / len(views)).clamp_min_(torch.finfo(torch.float32).tiny).log_()


def working_size_of(data: DataConfig) -> tuple[int, int] | None:
    """The (H, W) every image is resized to before the eval transform pads it; None: each keeps its own."""
    return (data.resize[0], data.resize[1]) if data.resize else None


def valid_sizes(source_hw: torch.Tensor, size: tuple[int, int] | None) -> list[tuple[int, int]]:
    """Each image's (H, W) before padding: ``size`` (`working_size_of`) or its original size.

    ``source_hw``: (N, 2) original heights and widths, on the CPU (the batch's ``source_hw``).
    """
    return [size or (int(h), int(w)) for h, w in source_hw.tolist()]


def _is_plain(cfg: EvalConfig) -> bool:
    return cfg.mode == "whole" and not cfg.flip and list(cfg.scales) == [1.0]


@torch.no_grad()
def eval_logits(
    model: nn.Module, images: torch.Tensor, *, cfg: EvalConfig, num_classes: int, size_divisor: int,
    valid_hw: Sequence[tuple[int, int]], multilabel: bool = False,
) -> torch.Tensor:  # fmt: skip
    """`infer_logits` with the ``eval`` section on a batch the eval transform padded bottom/right.

    ``images``: (N, 3, Hp, Wp); ``valid_hw``: each image's (H, W) before padding
    (`valid_sizes`). Returns (N, C, Hp, Wp) float32 whose [:H, :W] of each image are its
    logits; outside that region the values mean nothing (callers crop them or score them as
    ignored). Slide and test-time augmentation run on each image's own region (images of one
    size together), so padding never shifts a window or a rescaled view. Plain whole-image
    inference runs on the padded batch as it is: the same input as cropping and padding
    again to ``size_divisor`` when that is the transform's divisor.
    """
    if _is_plain(cfg):
        return _forward(model, images, num_classes=num_classes, size_divisor=size_divisor)

    def infer(region: torch.Tensor) -> torch.Tensor:
        return infer_logits(model, region, num_classes=num_classes, mode=cfg.mode, crop=cfg.crop, stride=cfg.stride,
                            flip=cfg.flip, scales=cfg.scales, batch_windows=cfg.batch_windows,
                            size_divisor=size_divisor, multilabel=multilabel)  # fmt: skip

    groups: dict[tuple[int, int], list[int]] = {}
    for index, size in enumerate(valid_hw):
        groups.setdefault(size, []).append(index)
    full_size = tuple(images.shape[-2:])
    if len(groups) == 1 and next(iter(groups)) == full_size:
        return infer(images)
    logits = images.new_zeros((images.shape[0], num_classes, *full_size), dtype=torch.float32)
    for (height, width), indices in groups.items():
        rows = torch.tensor(indices, device=images.device)
        region = images[rows, :, :height, :width]
        logits[rows, :, :height, :width] = infer(region)
    return logits
