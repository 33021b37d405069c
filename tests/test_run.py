"""The training-run object: checkpoint format, safe loading, non-finite steps, accumulation, run folders."""

import dataclasses
import json
import pickle
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segohem.bank_store import read_meta
from segohem.cli import main, run_train
from segohem.engine import loop
from segohem.engine.checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    decode_arrays,
    load_checkpoint,
    save_checkpoint,
)
from segohem.engine.loop import TrainingDiverged, train_one_epoch
from segohem.engine.run import CHECKPOINT_FORMAT, TrainingRun
from segohem.engine.run_folder import RunFolderBusy, lock_run_folder
from segohem.tracking import NullLogger

from .conftest import tiny_config

NUM_CLASSES = 7


def toy_run(tmp_path, *overrides):
    """A run whose model is one 1x1 convolution, trained by plain SGD at lr 1 with plain CE."""
    cfg = tiny_config(tmp_path, "ohem.mode=none", "bank.enabled=false", *overrides)
    run = TrainingRun.create(cfg, steps_per_epoch=4)
    torch.manual_seed(0)
    model = nn.Conv2d(3, NUM_CLASSES, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return dataclasses.replace(run, model=model, optimizer=optimizer, scheduler=scheduler)


def toy_batches(count, *, nan_at=()):
    generator = torch.Generator().manual_seed(1)
    batches = []
    for index in range(count):
        image = torch.randn(2, 3, 8, 8, generator=generator)
        if index in nan_at:
            image[0, 0, 0, 0] = float("nan")
        mask = torch.randint(0, NUM_CLASSES, (2, 8, 8), generator=generator)
        batches.append({"image": image, "mask": mask, "sample_id": [f"s{index}a", f"s{index}b"]})
    return batches


class RecordingLogger(NullLogger):
    def __init__(self):
        self.steps = []

    def log_step(self, metrics, *, step):
        self.steps.append((step, metrics))


def test_partial_accumulation_group_is_averaged_over_its_own_size(tmp_path):
    run = toy_run(tmp_path, "optim.accumulate=2", "train.log_every=1")
    batches = toy_batches(3)
    reference = nn.Conv2d(3, NUM_CLASSES, 1)
    reference.load_state_dict(run.model.state_dict())
    expected_losses = []
    for group in (batches[:2], batches[2:]):  # the last group holds one batch
        losses = [F.cross_entropy(reference(b["image"]), b["mask"]) for b in group]
        torch.stack(losses).mean().backward()
        with torch.no_grad():
            for param in reference.parameters():
                param -= param.grad
                param.grad = None
        expected_losses.append(float(torch.stack(losses).mean().detach()))
    logger = RecordingLogger()
    train_one_epoch(run, batches, logger=logger)
    assert run.progress.step == 2
    for got, want in zip(run.model.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(got, want, atol=1e-6)
    assert [m["train/loss"] for _, m in logger.steps] == pytest.approx(expected_losses, rel=1e-6)


def test_non_finite_steps_are_skipped_and_counted(tmp_path):
    run = toy_run(tmp_path, "train.max_nonfinite_steps=2")
    before = [p.detach().clone() for p in run.model.parameters()]
    batches = toy_batches(3, nan_at=(0,))
    train_one_epoch(run, batches[:1], logger=NullLogger())
    assert run.progress.skipped_steps == 1 and run.progress.step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, run.model.parameters(), strict=True))
    train_one_epoch(run, batches[1:], logger=NullLogger())
    assert run.progress.step == 2 and all(torch.isfinite(p).all() for p in run.model.parameters())


def test_a_skipped_step_leaves_the_batch_norm_statistics_as_they_were(tmp_path):
    run = toy_run(tmp_path, "train.max_nonfinite_steps=2")
    model = nn.Sequential(run.model, nn.BatchNorm2d(NUM_CLASSES))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    run = dataclasses.replace(run, model=model, optimizer=optimizer, scheduler=scheduler)
    before = [b.detach().clone() for b in run.model.buffers()]  # running mean, var and batch count
    batches = toy_batches(2, nan_at=(0,))
    train_one_epoch(run, batches[:1], logger=NullLogger())  # its forward pass moved them to NaN
    assert run.progress.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, run.model.buffers(), strict=True))
    train_one_epoch(run, batches[1:], logger=NullLogger())  # a finite step still moves them
    assert run.progress.step == 1 and all(torch.isfinite(b.float()).all() for b in run.model.buffers())
    assert not torch.equal(before[0], run.model[1].running_mean)


def test_consecutive_non_finite_steps_stop_the_run(tmp_path):
    run = toy_run(tmp_path, "train.max_nonfinite_steps=2")
    with pytest.raises(TrainingDiverged, match="2 optimizer steps in a row"):
        train_one_epoch(run, toy_batches(3, nan_at=(0, 1)), logger=NullLogger())


def test_a_diverging_run_exits_non_zero_without_saving_non_finite_weights(tmp_path, capsys):
    args = ["train", f"run.output_dir={tmp_path}", "run.name=diverge", "run.device=cpu", "data.num_train=16",
            "data.num_val=4", "data.image_size=[64,64]", "data.batch_size=4", "train.epochs=3",
            "train.progress=false", "optim.lr=1.0e+6", "train.max_nonfinite_steps=2"]  # fmt: skip
    assert main(args) == 3
    err = capsys.readouterr().err
    assert "diverged" in err or "weights are not finite" in err
    for path in (tmp_path / "diverge").glob("*.pt"):
        weights = load_checkpoint(path)["model"]
        assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point()), path


def test_checkpoints_load_with_weights_only_and_declare_their_format(tmp_path):
    run_train(tiny_config(tmp_path, "train.max_steps=2"), resume_from=None)
    checkpoint = torch.load(tmp_path / "tiny" / "last.pt", weights_only=True)
    assert checkpoint["format"] == CHECKPOINT_FORMAT
    assert checkpoint["progress"]["step"] == 2 and checkpoint["bank"]["samples"]


class Exploit:
    marker = None

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_crafted_checkpoint_does_not_run_code(tmp_path, capsys):
    Exploit.marker = tmp_path / "pwned"
    crafted = tmp_path / "crafted.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "model": Exploit()}, crafted)
    assert main(["eval", "--checkpoint", str(crafted)]) == 2
    assert not Exploit.marker.exists()
    err = capsys.readouterr().err
    assert str(crafted) in err and "safe loading refuses" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated zip", pickle.dumps({"a": 1})[:5]])
def test_empty_truncated_or_corrupt_checkpoints_give_one_line(tmp_path, capsys, content):
    path = tmp_path / "broken.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"broken\.pt"):
        load_checkpoint(path)
    assert main(["eval", "--checkpoint", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "broken.pt" in err[0]


def test_a_kill_between_best_and_last_is_repaired_by_resume(tmp_path, monkeypatch):
    straight = run_train(tiny_config(tmp_path, "run.name=straight", "train.epochs=2"), resume_from=None)
    cfg = tiny_config(tmp_path, "run.name=killed", "train.epochs=2")
    original = loop.save_checkpoint

    def kill_before_last(state, path):
        if path.name == "last.pt" and state["progress"]["epoch"] == 2:
            raise KeyboardInterrupt("killed after best.pt, before last.pt")
        original(state, path)

    monkeypatch.setattr(loop, "save_checkpoint", kill_before_last)
    with pytest.raises(KeyboardInterrupt):
        run_train(cfg, resume_from=None)
    monkeypatch.undo()
    run_dir = tmp_path / "killed"
    assert load_checkpoint(run_dir / "last.pt")["progress"]["epoch"] == 1
    (run_dir / ".last.pt.leftover.tmp").write_bytes(b"x" * 100)  # what a kill mid-write leaves
    resumed = run_train(cfg, resume_from=run_dir)
    assert not list(run_dir.glob(".*.tmp"))
    assert resumed.best_miou == straight.best_miou and resumed.best_epoch == straight.best_epoch
    best, last = load_checkpoint(run_dir / "best.pt"), load_checkpoint(run_dir / "last.pt")
    assert last["progress"]["best_epoch"] == best["progress"]["epoch"]
    reference = load_checkpoint(tmp_path / "straight" / "best.pt")
    assert all(torch.equal(best["model"][k], reference["model"][k]) for k in reference["model"])


def test_a_second_writer_is_refused_with_the_holder_named(tmp_path, capsys):
    run_dir = tmp_path / "tiny"
    with lock_run_folder(run_dir):
        with pytest.raises(RunFolderBusy, match="in use by process"):
            run_train(tiny_config(tmp_path, "train.max_steps=1"), resume_from=None)
        assert main(["train", f"run.output_dir={tmp_path}", "run.name=tiny"]) == 2
        assert "in use by process" in capsys.readouterr().err
    run_train(tiny_config(tmp_path, "train.max_steps=1"), resume_from=None)  # free again


def test_a_failed_resume_leaves_the_run_config_alone(tmp_path, capsys):
    run_train(tiny_config(tmp_path, "train.max_steps=1", "train.epochs=3"), resume_from=None)
    run_dir = tmp_path / "tiny"
    before = (run_dir / "config.yaml").read_bytes()
    assert main(["train", "--resume", str(run_dir), "model.encoder=resnet34"]) == 2
    err = capsys.readouterr().err
    assert "last.pt" in err and "does not fit the configured model" in err
    assert (run_dir / "config.yaml").read_bytes() == before
    assert main(["train", "--resume", str(run_dir), "--config", str(run_dir / "config.yaml")]) == 2
    assert "--config cannot be combined with --resume" in capsys.readouterr().err
    assert main(["train", "--resume", str(run_dir), "train.max_steps=2"]) == 0


def test_a_resume_that_meets_bad_data_leaves_the_run_config_alone(tmp_path, capsys):
    from .test_bad_inputs import write_dataset

    good, bad = write_dataset(tmp_path / "good"), write_dataset(tmp_path / "bad")
    for image in (bad / "train").iterdir():
        image.write_bytes(b"")  # found only when the first batch is read, inside the training loop
    folder = ["data.kind=folder", "data.class_names=[a, b, c]", "data.batch_size=2", "data.val_batch_size=2"]
    run_train(tiny_config(tmp_path, *folder, f"data.root={good}", "train.epochs=1"), resume_from=None)
    run_dir = tmp_path / "tiny"
    before = (run_dir / "config.yaml").read_bytes()
    assert main(["train", "--resume", str(run_dir), f"data.root={bad}", "train.epochs=2"]) == 2
    assert "the file is empty" in capsys.readouterr().err
    assert (run_dir / "config.yaml").read_bytes() == before
    assert main(["train", "--resume", str(run_dir), "train.epochs=2"]) == 0  # with the root of its last.pt
    assert f"root: {good}" in (run_dir / "config.yaml").read_text()


def test_loaded_bank_does_not_share_arrays_with_the_checkpoint(tmp_path):
    run_train(tiny_config(tmp_path, "train.max_steps=2"), resume_from=None)
    cfg = tiny_config(tmp_path, "train.max_steps=2")
    run = TrainingRun.resume(cfg, tmp_path / "tiny" / "last.pt", steps_per_epoch=2)
    checkpoint = load_checkpoint(tmp_path / "tiny" / "last.pt")
    sample_id = next(iter(run.bank.samples))
    run.bank.samples[sample_id].hard_acc += 1.0
    assert not torch.equal(torch.from_numpy(run.bank.samples[sample_id].hard_acc),
                           checkpoint["bank"]["samples"][sample_id]["hard_acc"])  # fmt: skip


def test_save_checkpoint_round_trips_plain_state(tmp_path):
    save_checkpoint({"format": CHECKPOINT_FORMAT, "value": torch.arange(3)}, tmp_path / "x.pt")
    assert torch.equal(load_checkpoint(tmp_path / "x.pt")["value"], torch.arange(3))


def test_channels_last_training_matches_the_default_layout(tmp_path):
    common = ("train.max_steps=1", "train.epochs=1", "optim.name=sgd", "optim.lr=0.01")
    run_train(tiny_config(tmp_path, "run.name=a", *common), resume_from=None)
    run_train(tiny_config(tmp_path, "run.name=b", *common, "train.channels_last=true"), resume_from=None)
    losses = [json.loads((tmp_path / name / "metrics.jsonl").read_text())["train/loss"] for name in "ab"]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    weights = load_checkpoint(tmp_path / "b" / "last.pt")["model"]
    reference = load_checkpoint(tmp_path / "a" / "last.pt")["model"]
    assert all(torch.allclose(weights[k].float(), reference[k].float(), atol=1e-4) for k in reference)


def format_1_checkpoint(new, path):
    """What segohem wrote before format 2: NumPy RNG state, dense bank confusions, 'train_state'."""
    rng = dict(new["rng"])
    saved = rng["numpy"]
    rng["numpy"] = (saved["kind"], saved["keys"].numpy().astype(np.uint32), saved["position"], saved["has_gauss"],
                    saved["cached_gauss"])  # fmt: skip
    bank = decode_arrays(new["bank"])
    for stats in bank["samples"].values():
        dense = np.zeros(stats["num_classes"] ** 2, np.int64)
        dense[stats.pop("confusion_pairs")] = stats.pop("confusion_counts")
        stats["confusion"] = dense.reshape(stats["num_classes"], -1)
        del stats["num_classes"]
    progress = {k: v for k, v in new["progress"].items() if k != "skipped_steps"}
    old = {k: v for k, v in new.items() if k not in ("format", "progress")}
    torch.save({**old, "train_state": progress, "rng": rng, "bank": bank}, path)


def test_a_format_1_checkpoint_is_refused_then_upgraded_on_request(tmp_path, capsys):
    run_train(tiny_config(tmp_path, "train.max_steps=2"), resume_from=None)
    new = load_checkpoint(tmp_path / "tiny" / "last.pt")
    old = tmp_path / "old.pt"
    format_1_checkpoint(new, old)
    assert main(["eval", "--checkpoint", str(old)]) == 2
    assert f"segohem upgrade-checkpoint {old} --trusted" in capsys.readouterr().err
    assert main(["upgrade-checkpoint", str(old)]) == 2  # not without --trusted
    assert "--trusted" in capsys.readouterr().err
    assert main(["upgrade-checkpoint", str(old), "--trusted"]) == 0
    upgraded = torch.load(tmp_path / "old.v2.pt", weights_only=True)
    assert upgraded["format"] == CHECKPOINT_FORMAT and upgraded["progress"]["step"] == 2
    assert all(torch.equal(upgraded["model"][k], new["model"][k]) for k in new["model"])
    for key, stats in new["bank"]["samples"].items():
        assert torch.equal(upgraded["bank"]["samples"][key]["confusion_counts"], stats["confusion_counts"])
    assert main(["eval", "--checkpoint", str(tmp_path / "old.v2.pt")]) == 0


def test_resuming_a_finished_run_does_nothing_and_a_shorter_schedule_is_refused(tmp_path, capsys):
    run_train(tiny_config(tmp_path, "train.epochs=1"), resume_from=None)
    run_dir = tmp_path / "tiny"
    config_before, last_before = (run_dir / "config.yaml").read_bytes(), (run_dir / "last.pt").read_bytes()
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert "has finished: 1 epochs" in capsys.readouterr().out
    assert main(["train", "--resume", str(run_dir), "train.epochs=1", "train.max_steps=1"]) == 2
    assert "beyond train.epochs=1 / train.max_steps=1" in capsys.readouterr().err
    assert (run_dir / "config.yaml").read_bytes() == config_before
    assert (run_dir / "last.pt").read_bytes() == last_before
    assert main(["refine", "--run", str(run_dir), "train.progress=false"]) == 2
    assert "raise train.epochs above it" in capsys.readouterr().err
    assert not (tmp_path / "tiny-refine" / "config.yaml").exists()


@pytest.mark.parametrize(
    ("limit", "settings", "refused"),
    [
        (2**20, [], "could not write checkpoint {run_dir}/last.pt (the write stopped after 1.0 MiB"),
        (2**16, ["train.num_panels=0"], "could not write hard-pixel store {run_dir}/hard_pixels.sqlite ("),
        (2**12, [], "File too large: '{run_dir}/viz/epoch002/"),
    ],
    ids=["checkpoint", "dictionary-store", "panel"],
)
def test_a_full_disk_stops_training_with_the_file_named_and_resume_goes_on(tmp_path, limit, settings, refused):
    resource = pytest.importorskip("resource")  # a file size limit stands in for a full disk

    def refuse_files_above_the_limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a refused write raises EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    run_train(tiny_config(tmp_path, "train.epochs=1", *settings), resume_from=None)
    run_dir = tmp_path / "tiny"
    before = {name: (run_dir / name).read_bytes() for name in ("last.pt", "best.pt")}
    command = [sys.executable, "-m", "segohem.cli", "train", "--resume", str(run_dir), "train.epochs=2"]
    done = subprocess.run(command, capture_output=True, text=True, preexec_fn=refuse_files_above_the_limit, timeout=600)
    assert done.returncode == 4, done.stderr
    assert "Traceback" not in done.stderr and "libpng" not in done.stderr
    assert refused.format(run_dir=run_dir) in done.stderr
    assert "a training run: with --resume" in done.stderr
    assert {name: (run_dir / name).read_bytes() for name in before} == before  # epoch 1 is intact
    if "store" in refused:  # its transaction was rolled back (a store ahead of last.pt is rewritten on resume)
        assert int(read_meta(run_dir / "hard_pixels.sqlite")["epoch"]) == 1
    assert not list(run_dir.glob(".*.tmp"))
    # a plain --resume goes on with the settings of the resume the disk stopped (train.epochs=2)
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert load_checkpoint(run_dir / "last.pt")["progress"]["epoch"] == 2


def test_a_failing_write_that_is_not_the_disk_is_not_called_a_write_error(tmp_path, monkeypatch):
    def refuse(state, handle):
        raise RuntimeError("Cannot save multiple tensors or storages that view the same data as different types")

    monkeypatch.setattr(torch, "save", refuse)
    with pytest.raises(RuntimeError, match="view the same data") as raised:
        save_checkpoint({"x": 1}, tmp_path / "last.pt")
    assert not isinstance(raised.value, CheckpointWriteError)
    assert list(tmp_path.iterdir()) == []


def test_a_log_line_cut_short_by_a_full_disk_is_dropped_on_resume(tmp_path):
    from segohem.tracking import LocalLogger

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/lo')
    with pytest.warns(UserWarning, match=r"metrics.jsonl: dropped its last line, cut short"):
        LocalLogger(tmp_path, resume_step=2, resume_epoch=0)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "train/loss": 2.0}\n'
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "tra\n{"step": 2}\n')  # damage before the end
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 1: not a JSON record"):
        LocalLogger(tmp_path, resume_step=2, resume_epoch=0)
