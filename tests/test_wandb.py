import json
import subprocess
import sys

import pytest

import segohem.wandb_logger
from segohem.cli import run_train

from .conftest import tiny_config
from .wandb_files import history, media, read_records, summary


def offline_runs(run_dir):
    return sorted((run_dir / "wandb").glob("offline-run-*"))


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_a_real_offline_run_holds_metrics_masks_table_and_artifacts(tmp_path, offline):
    run_train(tiny_config(tmp_path), resume_from=None)
    run_dir = tmp_path / "tiny"
    (offline_dir,) = offline_runs(run_dir)
    records = read_records(next(offline_dir.glob("run-*.wandb")))
    rows = history(records)
    steps = [r for r in rows if "train/loss" in r]
    assert [r["trainer/step"] for r in steps] == [1, 2, 3, 4]
    assert {"train/lr", "train/kept_fraction", "train/prob_threshold", "train/images_per_s"} <= steps[0].keys()
    epochs = [r for r in rows if "val/miou" in r]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert {"val/iou/pole", "val/iou/person", "val/pixel_acc", "val/mean_acc"} <= epochs[0].keys()
    logged = [r for r in rows if media(r, "val/examples")]
    assert [r["epoch"] for r in logged] == [1, 2]
    example = media(logged[0], "val/examples")
    assert example["_type"] == "images/separated" and example["count"] == 4
    assert set(example["all_masks"][0]) == {"ground_truth", "prediction", "hard_pixels", "errors"}
    assert media(logged[0], "val/confusion_matrix")["_type"] == "image-file"
    table = media(logged[0], "dictionary/hardest_images")
    assert table["_type"] == "table-file" and table["nrows"] == 8
    for row in logged:  # every mask layer of every image is a file in the run folder
        layers = [layer for masks in media(row, "val/examples")["all_masks"] for layer in masks.values()]
        assert len(layers) == 4 * 4
        assert all((offline_dir / "files" / layer["path"]).is_file() for layer in layers)
    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    assert {a.type for a in artifacts} >= {"checkpoint", "hard-pixel-dictionary"}
    assert "best" in {alias for a in artifacts for alias in a.aliases}
    final = summary(records)
    assert final["val/miou"]["max"] == pytest.approx(max(r["val/miou"] for r in epochs))
    # W&B's own reader opens the run and finds the metrics, the summary and the images
    command = [sys.executable, "-m", "wandb", "leet", "inspect", "--summary", str(offline_dir)]
    shown = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    assert "val/miou" in shown and "val/examples" in shown and "images/separated" in shown
    config = [r for r in records if r.WhichOneof("record_type") == "config"]
    keys = {item.key for r in config for item in r.config.update}
    assert {"ohem", "optim", "data", "model"} <= keys


def test_resume_continues_the_same_wandb_run(tmp_path, offline):
    run_train(tiny_config(tmp_path, "train.epochs=1"), resume_from=None)
    run_dir = tmp_path / "tiny"
    run_train(tiny_config(tmp_path, "train.epochs=2"), resume_from=run_dir)
    first, second = offline_runs(run_dir)
    assert first.name.split("-")[-1] == second.name.split("-")[-1] == (run_dir / "wandb_run_id.txt").read_text()
    resumed_steps = [
        r["trainer/step"] for r in history(read_records(next(second.glob("*.wandb")))) if "train/loss" in r
    ]
    assert resumed_steps == [3, 4]


def test_a_wandb_failure_warns_and_training_goes_on(tmp_path, offline, monkeypatch):
    import wandb

    def broken_init(**kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(wandb, "init", broken_init)
    with pytest.warns(UserWarning, match="W&B logging failed.*No space left"):
        state = run_train(tiny_config(tmp_path), resume_from=None)
    assert state.epoch == 2
    lines = (tmp_path / "tiny" / "epochs.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_mode_resolution(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setattr(segohem.wandb_logger, "has_credentials", lambda: False)
    assert segohem.wandb_logger.resolve_mode("auto") == "offline"
    monkeypatch.setattr(segohem.wandb_logger, "has_credentials", lambda: True)
    assert segohem.wandb_logger.resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert segohem.wandb_logger.resolve_mode("online") == "disabled"
