"""Region losses (Dice, Lovász-softmax, focal) on the pixels OHEM kept, combined with its cross-entropy.

The region loss is segmentation-models-pytorch's own, given masked inputs: every pixel OHEM did
not keep is relabelled ``ignore_index``, which each of these losses leaves out. So "Dice on the
kept pixels" is exactly Dice computed on the kept pixels alone (tests/test_losses.py checks it).
"""

from __future__ import annotations

import torch
from segmentation_models_pytorch.losses import DiceLoss, FocalLoss, LovaszLoss
from torch import Tensor, nn

from segohem.ohem import OhemCrossEntropy, OhemResult, PackedMultiLabel, TwoClassAsBinary

REGION_LOSSES: tuple[str, ...] = ("none", "dice", "lovasz", "focal")


def region_loss_fn(name: str, *, ignore_index: int) -> nn.Module:
    """The smp multiclass loss ``name`` (dice | lovasz | focal), ignoring ``ignore_index``."""
    if name == "dice":
        return DiceLoss("multiclass", from_logits=True, ignore_index=ignore_index)
    if name == "lovasz":
        return LovaszLoss("multiclass", ignore_index=ignore_index, from_logits=True)
    if name == "focal":
        return FocalLoss("multiclass", ignore_index=ignore_index)
    raise ValueError(f"region loss {name!r} is unknown; valid: {', '.join(REGION_LOSSES[1:])}")


def kept_target(target: Tensor, hard_mask: Tensor, *, ignore_index: int) -> Tensor:
    """``target`` with every pixel that OHEM did not keep set to ``ignore_index``."""
    return target.masked_fill(~hard_mask, ignore_index)


class OhemRegionLoss(nn.Module):
    """``ce_weight`` x OHEM cross-entropy + ``region_weight`` x a region loss on the kept pixels.

    forward takes and returns what `OhemCrossEntropy.forward` does; only ``loss`` differs. The
    region loss sees fp32 logits and is not re-weighted by ``pixel_weight`` (a set-level loss
    has no per-pixel terms to weigh). Nothing kept (an all-ignored batch): the region term is an
    exact zero attached to the graph, as the cross-entropy's is.
    """

    def __init__(self, ohem: OhemCrossEntropy | TwoClassAsBinary, region: str, *, ce_weight: float = 1.0,
                 region_weight: float = 1.0) -> None:  # fmt: skip
        super().__init__()
        self.ohem, self.region_name = ohem, region
        self.region = None if region == "none" else region_loss_fn(region, ignore_index=ohem.ignore_index)
        self.ce_weight, self.region_weight = ce_weight, region_weight

    @property
    def ignore_index(self) -> int:
        return self.ohem.ignore_index

    def forward(
        self, logits: Tensor, target: Tensor, *, step: int | None = None, pixel_weight: Tensor | None = None
    ) -> OhemResult:
        result = self.ohem(logits, target, step=step, pixel_weight=pixel_weight)
        if self.region is None:
            return result._replace(loss=self.ce_weight * result.loss)
        if not bool(result.hard_mask.any()):  # host sync: smp's Lovász / focal give no scalar / NaN then
            return result._replace(loss=self.ce_weight * result.loss + 0.0 * logits.sum())
        masked = kept_target(target, result.hard_mask, ignore_index=self.ohem.ignore_index)
        region = self.region(logits.float(), masked)
        loss = self.ce_weight * result.loss + self.region_weight * region.to(torch.float32)
        return result._replace(loss=loss)


# What the loop, mining and the gallery call.
SegmentationLoss = OhemCrossEntropy | TwoClassAsBinary | PackedMultiLabel | OhemRegionLoss
