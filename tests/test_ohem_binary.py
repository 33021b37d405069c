"""Binary and multi-label OHEM: hard positives and hard negatives chosen apart, at a ratio."""

from unittest import mock

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segohem import ohem
from segohem.bank_store import load_bank
from segohem.cli import main
from segohem.config import ConfigError, load_config
from segohem.engine.run import build_loss
from segohem.ohem import OhemBinaryCrossEntropy, TwoClassAsBinary

IGNORE = 255


def logits_for(loss: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Logits whose binary cross-entropy against ``target`` is ``loss`` (loss > 0)."""
    p_true = torch.exp(-loss)
    logit_true = torch.log(p_true / (1 - p_true))
    return torch.where(target == 1, logit_true, -logit_true)


def test_positives_by_top_k_and_negatives_by_ratio():
    target = torch.tensor([[[[1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]]]])
    loss = torch.tensor([[[[0.1, 2.0, 0.5, 1.0, 0.2, 3.0, 0.05, 1.5, 0.7, 0.3, 2.5, 0.9]]]])
    criterion = OhemBinaryCrossEntropy(mode="topk", top_k=0.5, neg_ratio=2.0, min_neg=0)
    result = criterion(logits_for(loss, target), target)
    kept = result.hard_mask[0, 0, 0].tolist()
    # positives: the 2 hardest of 4 (2.0, 1.0); negatives: 2 x 2 = 4 hardest of 8 (3.0, 2.5, 1.5, 0.9)
    assert kept == [False, True, False, True, False, True, False, True, False, False, True, True]
    assert result.loss.item() == pytest.approx((2.0 + 1.0 + 3.0 + 2.5 + 1.5 + 0.9) / 6, rel=1e-5)
    assert result.num_kept.tolist() == [6] and result.num_valid.tolist() == [12]


def test_threshold_mode_and_a_channel_without_positives_keeps_min_neg():
    target = torch.tensor([[[[1, 1, 1, 0, 0, 0, 0, 0]], [[0, 0, 0, 0, 0, 0, 0, IGNORE]]]]).reshape(1, 2, 1, 8)
    loss = torch.tensor([[[[0.1, 2.0, 0.5, 1.0, 0.2, 3.0, 0.05, 1.5]], [[0.4, 0.3, 2.0, 0.1, 0.2, 0.6, 1.0, 9.0]]]])
    loss = loss.reshape(1, 2, 1, 8)
    criterion = OhemBinaryCrossEntropy(mode="threshold", thresh=0.5, min_kept=1, neg_ratio=1.0, min_neg=2)
    result = criterion(logits_for(loss, target), target)
    # channel 0: positives with p < 0.5 (loss > 0.693): 2.0 only; negatives max(1 x 1, 2) = 2: 3.0, 1.5
    assert result.hard_mask[0, 0, 0].tolist() == [False, True, False, False, False, True, False, True]
    # channel 1 (no positives, one ignored): the 2 hardest negatives, never the ignored 9.0
    assert result.hard_mask[0, 1, 0].tolist() == [False, False, True, False, False, False, True, False]


def test_mode_none_is_plain_binary_cross_entropy_over_valid_entries():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 5)
    target = torch.randint(0, 2, (2, 3, 5, 5))
    target[0, 1, :2] = IGNORE
    result = OhemBinaryCrossEntropy(mode="none")(logits, target)
    valid = target != IGNORE
    expected = F.binary_cross_entropy_with_logits(logits[valid], target[valid].float())
    assert result.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.equal(result.hard_mask, valid)


def test_device_path_chooses_what_the_host_path_does():
    torch.manual_seed(1)
    logits, target = torch.randn(3, 2, 16, 16), torch.randint(0, 2, (3, 2, 16, 16))
    criterion = OhemBinaryCrossEntropy(mode="topk", top_k=0.3, neg_ratio=3.0)
    host = criterion(logits, target)
    with mock.patch.object(ohem, "_sync_free", lambda tensor: True):
        device = criterion(logits, target)
    assert torch.equal(host.hard_mask, device.hard_mask) and host.loss.item() == pytest.approx(device.loss.item())


def test_bad_binary_targets_are_named():
    with pytest.raises(ValueError, match=r"target values \[2\] are not 0, 1"):
        OhemBinaryCrossEntropy()(torch.zeros(1, 1, 2, 2), torch.tensor([[[[0, 1], [2, 1]]]]))
    with pytest.raises(ValueError, match="K = 1"):
        OhemBinaryCrossEntropy()(torch.zeros(1, 1, 2, 2), torch.zeros(1, 2, 2))


def test_two_class_model_is_a_sigmoid_of_the_logit_difference():
    torch.manual_seed(2)
    logits, target = torch.randn(2, 2, 6, 6), torch.randint(0, 2, (2, 6, 6))
    plain = TwoClassAsBinary(OhemBinaryCrossEntropy(mode="none"))(logits, target)
    assert plain.loss.item() == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-5)
    assert plain.hard_mask.shape == target.shape and plain.pixel_loss.shape == target.shape


def test_neg_ratio_needs_two_classes():
    with pytest.raises(ConfigError, match="has 7 classes"):
        build_loss(load_config(None, ["ohem.neg_ratio=3"]))


def test_binary_training_records_hard_positives_and_negatives(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 4)):
        (tmp_path / split).mkdir()
        (tmp_path / f"{split}annot").mkdir()
        for i in range(count):
            mask = np.zeros((32, 32), np.uint8)
            mask[8:20, rng.integers(0, 20) :][:, :4] = 255  # a thin vertical "defect"
            image = rng.integers(0, 60, (32, 32, 3)).astype(np.uint8)
            image[mask > 0] += 120
            cv2.imwrite(str(tmp_path / split / f"{i}.png"), image)
            cv2.imwrite(str(tmp_path / f"{split}annot" / f"{i}.png"), mask)
    code = main([
        "train", f"run.output_dir={tmp_path}", "run.name=binary", "data.kind=folder", f"data.root={tmp_path}",
        "data.mask_format=binary", "model.encoder=resnet18", "data.batch_size=4", "train.epochs=2",
        "train.progress=false", "ohem.mode=topk", "ohem.top_k=0.5", "ohem.neg_ratio=3", "wandb.mode=disabled",
    ])  # fmt: skip
    assert code == 0
    bank = load_bank(tmp_path / "binary" / "hard_pixels.sqlite")
    positives = sum(stats.hard_positives() for stats in bank.samples.values())
    assert len(bank.samples) == 8 and positives[1] > 0 and positives[0] > 0  # hard foreground and background
    # at most 3 negatives per kept positive, at least 1% of the negatives
    assert positives[0] <= 3 * positives[1] + 0.01 * 8 * 32 * 32 * 2 + 8 * 2
