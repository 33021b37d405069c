import json

import numpy as np
import pytest
import torch

from segohem.cli import run_train
from segohem.data.datasets import SyntheticDataset
from segohem.engine.checkpoint import load_checkpoint, save_checkpoint
from segohem.engine.optim import poly_lr_factor

from .conftest import tiny_config


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_step_end_to_end_train_writes_the_run_folder(tmp_path):
    cfg = tiny_config(tmp_path, "train.max_steps=2")
    state = run_train(cfg, resume_from=None)
    run_dir = tmp_path / "tiny"
    assert state.step == 2 and state.epoch == 1
    for name in (
        "config.yaml",
        "last.pt",
        "best.pt",
        "metrics.jsonl",
        "epochs.jsonl",
        "epochs.csv",
        "hard_pixels.sqlite",
        "plots/class_iou.png",
        "plots/training_curves.png",
        "viz/epoch001/confusion.png",
    ):
        assert (run_dir / name).is_file(), name
    steps = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in steps] == [1, 2]
    assert all(0 < r["train/kept_fraction"] <= 1 and r["train/loss"] > 0 for r in steps)
    epoch = read_jsonl(run_dir / "epochs.jsonl")[0]
    assert 0 <= epoch["val/miou"] <= 1 and "val/iou/pole" in epoch
    checkpoint = load_checkpoint(run_dir / "last.pt")
    assert checkpoint["progress"]["step"] == 2 and checkpoint["config"]["run"]["name"] == "tiny"
    for key in ("model", "optimizer", "scheduler", "scaler", "rng"):
        assert key in checkpoint
    with pytest.raises(ValueError, match="already holds a run"):
        run_train(cfg, resume_from=None)


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, monkeypatch):
    straight = tiny_config(tmp_path, "run.name=straight", "train.epochs=3")
    run_train(straight, resume_from=None)

    original = SyntheticDataset.set_epoch

    def crash_in_epoch_two(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt("simulated kill after epoch 1")
        original(self, epoch)

    interrupted = tiny_config(tmp_path, "run.name=resumed", "train.epochs=3")
    monkeypatch.setattr(SyntheticDataset, "set_epoch", crash_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        run_train(interrupted, resume_from=None)
    monkeypatch.setattr(SyntheticDataset, "set_epoch", original)
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["progress"]["step"] == 2
    state = run_train(interrupted, resume_from=tmp_path / "resumed")
    assert state.step == 6 and state.epoch == 3

    expected = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    got = read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    assert [r["train/loss"] for r in got] == [r["train/loss"] for r in expected]
    checkpoint_a = load_checkpoint(tmp_path / "straight" / "last.pt")
    checkpoint_b = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert all(torch.equal(checkpoint_a["model"][k], checkpoint_b["model"][k]) for k in checkpoint_a["model"])
    bank_a, bank_b = checkpoint_a["bank"]["samples"], checkpoint_b["bank"]["samples"]
    assert bank_a.keys() == bank_b.keys() and len(bank_a) == 8
    for key in bank_a:  # the dictionary went through the checkpoint and came back intact
        assert bank_a[key]["seen"] == bank_b[key]["seen"] == 3
        assert np.array_equal(bank_a[key]["hard_acc"], bank_b[key]["hard_acc"])
        for name in ("confusion_pairs", "confusion_counts"):
            assert np.array_equal(bank_a[key][name], bank_b[key][name])


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"value": 1}, path)

    def broken_save(obj, handle):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"value": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["value"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_poly_schedule_with_warmup():
    factors = [poly_lr_factor(s, total_steps=10, warmup_steps=2, power=1.0, min_factor=0.0) for s in range(11)]
    assert factors[0] == 0.5 and factors[1] == 1.0
    assert factors[5] == pytest.approx(0.5) and factors[10] == 0.0


def test_gradient_accumulation_and_clipping_count_optimizer_steps(tmp_path):
    state = run_train(
        tiny_config(tmp_path, "train.epochs=1", "data.batch_size=2", "optim.accumulate=2", "optim.clip_grad_norm=1.0"),
        resume_from=None,
    )
    assert state.step == 2  # 4 batches of 2, one optimizer step per 2 batches
