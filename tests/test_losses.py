"""Class quotas on hand-made inputs, and region losses evaluated on the OHEM-kept pixels."""

import pytest
import torch
from segmentation_models_pytorch.losses import DiceLoss, FocalLoss, LovaszLoss

from segohem.config import load_config
from segohem.engine.run import build_loss
from segohem.losses import OhemRegionLoss, kept_target
from segohem.ohem import OhemCrossEntropy, class_quota_mask

IGNORE = 255


def test_class_quota_keeps_the_hardest_of_each_class_present():
    # one image of 2 x 5 pixels; class 0: 6 pixels, class 1: 3 pixels, one ignored
    target = torch.tensor([[[0, 0, 0, 0, 0], [0, 1, 1, 1, IGNORE]]])
    loss = torch.tensor([[[5.0, 4.0, 3.0, 2.0, 1.0], [0.5, 0.1, 0.3, 0.3, 9.0]]])
    valid = target != IGNORE
    keep = class_quota_mask(loss, target, valid, num_classes=3, amount=2)
    expected = torch.tensor([[[True, True, False, False, False], [False, False, True, True, False]]])
    assert torch.equal(keep, expected)  # class 1's tie at 0.3 keeps both; the ignored 9.0 never
    half = class_quota_mask(loss, target, valid, num_classes=3, amount=0.5)  # ceil(0.5 x 6) = 3, ceil(1.5) = 2
    assert half[0, 0].tolist() == [True, True, True, False, False]
    assert half[0, 1].tolist() == [False, False, True, True, False]
    everything = class_quota_mask(loss, target, valid, num_classes=3, amount=100)  # more than a class has
    assert torch.equal(everything, valid)


def test_class_quota_breaks_ties_by_lowest_index_and_works_per_image():
    target = torch.tensor([[[1, 1, 1, 1]], [[1, 0, 0, 1]]])
    loss = torch.ones(2, 1, 4)
    keep = class_quota_mask(loss, target, torch.ones_like(target, dtype=torch.bool), num_classes=2, amount=1)
    assert keep[0, 0].tolist() == [True, False, False, False]
    assert keep[1, 0].tolist() == [True, True, False, False]


def test_a_quota_gives_a_starved_class_gradient_under_topk():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 8, 8)
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[0, :, :2] = 2  # a thin class, 16 pixels
    logits[0, 2, :, :2] += 6.0  # well predicted: easy, never in the global top 10%
    logits[0, 0, :, 2:] -= 2.0  # the big class is the hard one
    plain = OhemCrossEntropy(mode="topk", top_k=0.1, ignore_index=IGNORE)(logits, target)
    quota = OhemCrossEntropy(mode="topk", top_k=0.1, ignore_index=IGNORE, class_min_kept=4)(logits, target)
    assert not plain.hard_mask[target == 2].any()
    assert quota.hard_mask[target == 2].sum() == 4
    assert quota.num_kept.item() == plain.num_kept.item() + 4
    assert torch.equal(quota.hard_mask & plain.hard_mask, plain.hard_mask)  # a quota only adds


@pytest.mark.parametrize("name, reference", [("dice", DiceLoss), ("lovasz", LovaszLoss), ("focal", FocalLoss)])
def test_region_loss_on_kept_pixels_equals_the_loss_of_the_kept_pixels_alone(name, reference):
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 16, 16, requires_grad=True)
    target = torch.randint(0, 4, (2, 16, 16))
    target[0, :3] = IGNORE
    ohem = OhemCrossEntropy(mode="topk", top_k=0.25, ignore_index=IGNORE)
    combined = OhemRegionLoss(ohem, name, ce_weight=0.0, region_weight=1.0)
    result = combined(logits, target)
    kept = result.hard_mask
    assert kept.sum() == 2 * 64 - 12  # 25% of each image's valid pixels, the ignored never
    # the kept pixels alone, gathered into one (1, C, K, 1) "image", no ignore id needed
    subset_logits = logits.permute(1, 0, 2, 3)[:, kept].reshape(1, 4, -1, 1)
    subset_target = target[kept].reshape(1, -1, 1)
    if name == "dice" or name == "lovasz":
        alone = reference("multiclass", from_logits=True)(subset_logits, subset_target)
    else:
        alone = reference("multiclass")(subset_logits, subset_target)
    assert result.loss.item() == pytest.approx(alone.item(), rel=1e-5)
    result.loss.backward()
    assert logits.grad[:, :, ~kept.any(0)].abs().max() == 0  # no gradient where nothing was kept


def test_combined_loss_weights_and_config():
    torch.manual_seed(2)
    logits, target = torch.randn(1, 3, 8, 8), torch.randint(0, 3, (1, 8, 8))
    ohem = OhemCrossEntropy(mode="topk", top_k=0.5, ignore_index=IGNORE)
    ce = ohem(logits, target).loss
    dice = DiceLoss("multiclass", from_logits=True, ignore_index=IGNORE)(
        logits, kept_target(target, ohem(logits, target).hard_mask, ignore_index=IGNORE)
    )
    both = OhemRegionLoss(ohem, "dice", ce_weight=0.5, region_weight=2.0)(logits, target).loss
    assert both.item() == pytest.approx(0.5 * ce.item() + 2.0 * dice.item(), rel=1e-6)
    cfg = load_config(None, ["ohem.region_loss=lovasz", "ohem.region_weight=0.5", "ohem.class_min_kept=0.1"])
    loss = build_loss(cfg)
    assert isinstance(loss, OhemRegionLoss) and loss.region_weight == 0.5 and loss.ohem.class_min_kept == 0.1
    assert isinstance(build_loss(load_config(None, [])), OhemCrossEntropy)


@pytest.mark.parametrize("name", ["dice", "lovasz", "focal"])
def test_nothing_kept_gives_a_zero_region_term_attached_to_the_graph(name):
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.full((2, 4, 4), IGNORE)
    result = OhemRegionLoss(OhemCrossEntropy(mode="topk", top_k=0.2, ignore_index=IGNORE), name)(logits, target)
    assert result.loss.shape == () and result.loss.item() == 0.0
    result.loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() == 0


def test_class_quota_names_labels_outside_the_classes():
    target = torch.tensor([[[0, 3, IGNORE]]])
    with pytest.raises(ValueError, match=r"label values \[3\] are outside \[0, 3\)"):
        class_quota_mask(torch.ones(1, 1, 3), target, target != IGNORE, num_classes=3, amount=1)
