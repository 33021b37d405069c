import json
import warnings
from collections import Counter

import numpy as np
import pytest
import torch

from segohem.bank import EpochClassStats, HardPixelBank, SampleStats, confusion_fields
from segohem.cli import main, run_train
from segohem.config import load_config
from segohem.data import build_dataset
from segohem.refine import BankDrivenDataset, WeightedEpochSampler, class_weights_from_bank, image_weights

from .conftest import interrupted_after_epoch, tiny_config


def stats(score, class_hard, grid=(12, 16)):
    confusion = np.diag(np.asarray(class_hard, np.int64))
    return SampleStats(
        height=96, width=128, hard_acc=np.zeros(grid, np.float32), seen_acc=np.ones(grid, np.float32),
        **confusion_fields(confusion), seen=1, ema_kept_fraction=1.0, ema_hard_loss=score,
    )  # fmt: skip


def test_image_weights_favour_hard_images_with_a_floor():
    bank = HardPixelBank(2)
    bank.samples = {"easy": stats(0.01, [10, 0]), "mid": stats(1.0, [10, 0]), "hard": stats(4.0, [10, 0])}
    weights = image_weights(bank, ["easy", "mid", "hard", "unseen"], score="image", floor=0.3)
    assert weights.mean() == pytest.approx(1.0)
    assert weights[2] > weights[1] > weights[0]
    assert weights[0] / weights[1] == pytest.approx(0.3 / (1.0 / (5.01 / 3)))  # floor: 0.3 x mean score
    # class mode: the one image with hard pixels of the rare class 1 carries half the mass
    bank.samples["mid"] = stats(1.0, [10, 2])
    weights = image_weights(bank, ["easy", "mid", "hard"], score="class", floor=0.0)
    assert weights.argmax() == 1


def test_weighted_sampler_is_deterministic_proportional_and_rank_consistent():
    weights = np.array([1.0, 1.0, 1.0, 5.0])
    sampler = WeightedEpochSampler(weights, seed=1)
    first = list(sampler)
    assert len(first) == 4 and list(sampler) == first
    counts: Counter[int] = Counter()
    for epoch in range(500):
        sampler.set_epoch(epoch)
        counts.update(key % 4 for key in sampler)  # repeats come as keys i + n * 4 (own augmentation)
    assert counts[3] / 2000 == pytest.approx(5 / 8, abs=0.03)
    assert counts[0] / 2000 == pytest.approx(1 / 8, abs=0.03)
    ranks = [list(WeightedEpochSampler(weights, seed=1, batch_size=1, rank=r, world_size=2)) for r in range(2)]
    merged = [i for pair in zip(*ranks, strict=True) for i in pair]
    assert merged == list(WeightedEpochSampler(weights, seed=1, batch_size=2))  # one process, batch 2


def hard_corner_bank():
    bank = HardPixelBank(7, cell_size=8)
    hardness = np.zeros((12, 16), np.float32)
    hardness[9:12, 13:16] = 1.0  # bottom-right corner of the 96x128 original
    bank.samples["synthetic-train-00000"] = SampleStats(
        height=96, width=128, hard_acc=hardness.copy(), seen_acc=np.ones_like(hardness),
        **confusion_fields(np.zeros((7, 7), np.int64)), seen=1,
    )  # fmt: skip
    return bank


def test_hard_crops_are_centred_on_hard_regions_and_weights_follow_the_map():
    cfg = load_config(None, ["data.image_size=[96, 128]", "data.resize=[48, 64]", "augment.hflip=0.0"])
    base = build_dataset(cfg.data, cfg.augment, split="train", train=True, seed=0)
    wrapped = BankDrivenDataset(base, hard_corner_bank(), hard_crop_prob=1.0, crop_scale=2.0, pixel_weight=3.0)
    for epoch in range(5):
        wrapped.set_epoch(epoch)
        sample = wrapped[0]
        assert sample["image"].shape == (3, 64, 64)  # 48x64 working size, padded to 64x64
        rows, cols = sample["source_yx"][0, :48], sample["source_yx"][1, :48]
        # a full-resolution window (one source pixel per pixel) that contains the hard corner
        assert torch.all(cols[:, 1:] - cols[:, :-1] == 1)
        assert rows.max() >= 72 and cols.max() >= 104
        in_corner = (rows >= 72) & (cols >= 104)
        assert torch.allclose(sample["pixel_weight"][:48][in_corner], torch.tensor(4.0))
        assert torch.allclose(sample["pixel_weight"][:48][~in_corner], torch.tensor(1.0))
    plain = BankDrivenDataset(base, hard_corner_bank(), hard_crop_prob=0.0)[0]
    assert torch.equal(plain["image"], base[0]["image"]) and "pixel_weight" not in plain


def test_mine_query_and_refine_end_to_end(tmp_path, capsys):
    run_train(tiny_config(tmp_path, "train.snapshot_epochs=[1]"), resume_from=None)
    run_dir = tmp_path / "tiny"
    store = tmp_path / "mined.sqlite"
    assert main(["mine", "--checkpoint", str(run_dir / "epoch001.pt"), "--output", str(store),
                 "train.progress=false"]) == 0  # fmt: skip
    assert "mined 8 train images" in capsys.readouterr().out
    assert main(["hard-pixels", "--store", str(store), "--format", "json", "--top", "3"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 3 and rows[0]["score"] >= rows[1]["score"] >= rows[2]["score"]
    assert main(["hard-pixels", "--run", str(run_dir), "--view", "classes", "--format", "csv"]) == 0
    assert capsys.readouterr().out.startswith("epoch,class,hard_pixels")
    code = main(["refine", "--run", str(run_dir), "--checkpoint", "epoch001.pt", "--bank", str(store),
                 "refine.sampler=class", "refine.hard_crop_prob=0.5", "refine.pixel_weight=1.0"])  # fmt: skip
    assert code == 0
    refined = tmp_path / "tiny-refine"
    steps = [json.loads(line)["step"] for line in (refined / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 4]  # epoch 2 of the schedule, continued from the epoch-1 snapshot
    assert (refined / "hard_pixels.sqlite").is_file() and (refined / "best.pt").is_file()
    assert main(["hard-pixels", "--run", str(run_dir), "--class", "nothing"]) == 2


def test_refine_with_a_refinement_head_then_evaluate_and_mine_it(tmp_path, capsys):
    run_train(tiny_config(tmp_path, "train.snapshot_epochs=[1]"), resume_from=None)
    run_dir = tmp_path / "tiny"
    code = main(["refine", "--run", str(run_dir), "--checkpoint", "epoch001.pt", "model.refine_head=8",
                 "refine.pixel_weight=1.0"])  # fmt: skip
    assert code == 0
    assert "attached a new refinement head (width 8)" in capsys.readouterr().out
    checkpoint = torch.load(tmp_path / "tiny-refine" / "last.pt", weights_only=False)
    head_keys = [key for key in checkpoint["model"] if key.startswith("head.")]
    assert head_keys and checkpoint["config"]["model"]["refine_head"] == 8
    assert any(float(checkpoint["model"][key].abs().sum()) > 0 for key in head_keys if key.startswith("head.6"))
    assert main(["eval", "--checkpoint", str(tmp_path / "tiny-refine" / "last.pt")]) == 0
    assert "mIoU" in capsys.readouterr().out
    store = tmp_path / "mined-head.sqlite"
    assert main(["mine", "--checkpoint", str(tmp_path / "tiny-refine" / "last.pt"), "--output", str(store),
                 "train.progress=false"]) == 0  # fmt: skip


def test_class_weights_follow_each_class_hard_fraction():
    bank = HardPixelBank(3)
    bank.epochs[0] = EpochClassStats(np.array([10, 90, 0]), np.array([100, 100, 0]))
    bank.epochs[4] = EpochClassStats(np.array([5, 80, 0]), np.array([100, 100, 0]))  # the latest epoch counts
    weights = class_weights_from_bank(bank, power=1.0)
    assert weights[1] / weights[0] == pytest.approx(16.0)
    assert weights[:2].mean() == pytest.approx(1.0) and weights[2] == 1.0  # unseen class keeps weight 1
    assert class_weights_from_bank(bank, power=0.0)[:2].tolist() == [1.0, 1.0]


def test_a_resumed_refinement_stage_is_still_driven_by_its_bank(tmp_path, monkeypatch):
    """A refinement stage interrupted and resumed draws, crops and weighs as it did: the bank
    that drives it is loaded again (it used to be dropped, leaving a plain continuation)."""
    run_train(tiny_config(tmp_path, "train.snapshot_epochs=[1]"), resume_from=None)
    stage = ["refine", "--run", str(tmp_path / "tiny"), "--checkpoint", "epoch001.pt", "train.epochs=3",
             "refine.sampler=class", "refine.hard_crop_prob=0.5", "refine.class_weight_power=1.0"]  # fmt: skip
    assert main([*stage, "run.name=straight"]) == 0
    with interrupted_after_epoch(monkeypatch, 2):
        main([*stage, "run.name=stopped"])
    assert main(["train", "--resume", str(tmp_path / "stopped")]) == 0
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["model"]
    resumed = torch.load(tmp_path / "stopped" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_refinement_bank_that_knows_no_training_image_is_refused(tmp_path):
    from segohem.cli.build import build_loaders
    from segohem.config import ConfigError

    cfg = tiny_config(tmp_path, "refine.sampler=image", "refine.bank=mined_val_best.sqlite")
    bank = HardPixelBank(7)
    bank.samples = {"synthetic-val-00000": stats(1.0, [10, 0]), "synthetic-val-00001": stats(2.0, [10, 0])}
    with pytest.raises(ConfigError, match=r"mined_val_best.sqlite holds none of the 8 training images .*--split train"):
        build_loaders(cfg, refine_bank=bank)  # a store mined on val: every image would weigh the same
    bank.samples["synthetic-train-00003"] = stats(4.0, [10, 0])
    with pytest.warns(UserWarning, match="knows 1 of the 8 training images"):
        build_loaders(cfg, refine_bank=bank)
    bank.samples.update({f"synthetic-train-{i:05d}": stats(1.0, [10, 0]) for i in range(8)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # all known: no warning
        build_loaders(cfg, refine_bank=bank)
