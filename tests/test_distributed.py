"""Training and evaluation under torchrun: 2 CPU processes on the gloo backend, synthetic data."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from segohem.bank_store import load_bank
from segohem.cli import main
from segohem.data.synthetic import render_scene
from segohem.engine.checkpoint import load_checkpoint
from segohem.mining import recall_weights

TINY = [
    "run.device=cpu", "data.num_train=16", "data.num_val=5", "data.image_size=[64,64]", "data.val_batch_size=2",
    "train.epochs=2", "train.progress=false", "train.num_panels=1", "train.num_bank_rows=2",
]  # fmt: skip
pytestmark = pytest.mark.slow


def environment():
    return {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def torchrun(*args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
            "-m", "segohem.cli", *args]  # fmt: skip


def run(command, **kwargs):
    done = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_processes_see_the_images_of_one_process_with_twice_the_batch(tmp_path):
    run(torchrun("train", f"run.output_dir={tmp_path}", "run.name=two", "data.batch_size=4", *TINY))
    run([sys.executable, "-m", "segohem.cli", "train", f"run.output_dir={tmp_path}", "run.name=one",
         "data.batch_size=8", *TINY])  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    bank_one, bank_two = load_bank(one / "hard_pixels.sqlite"), load_bank(two / "hard_pixels.sqlite")
    assert len(bank_two.samples) == 16  # every training image, whichever rank saw it
    assert {k: s.seen for k, s in bank_one.samples.items()} == {k: s.seen for k, s in bank_two.samples.items()}
    for key, stats in bank_one.samples.items():  # the same pixels of the same images were observed
        other = bank_two.samples[key]
        assert (stats.seen_acc > 0).tolist() == (other.seen_acc > 0).tolist()
        assert stats.confusion.sum() > 0 and other.confusion.sum() > 0
    checkpoint_one, checkpoint_two = load_checkpoint(one / "last.pt"), load_checkpoint(two / "last.pt")
    assert checkpoint_one["progress"]["step"] == checkpoint_two["progress"]["step"] == 4
    # Not bit-equal: batch norm normalizes over each process's 4 images (SyncBatchNorm needs
    # CUDA), not over 8, and gradients are averaged in another order. After 4 steps from the
    # same initialization the two runs stay close; 10 points of mIoU bounds the difference.
    miou_one, miou_two = checkpoint_one["metrics"]["val/miou"], checkpoint_two["metrics"]["val/miou"]
    assert abs(miou_one - miou_two) < 0.10, (miou_one, miou_two)
    assert sorted(p.name for p in two.iterdir() if p.suffix == ".pt") == ["best.pt", "last.pt"]


def test_distributed_evaluation_equals_one_process_exactly_with_an_odd_split(tmp_path):
    run([sys.executable, "-m", "segohem.cli", "train", f"run.output_dir={tmp_path}", "run.name=base",
         "data.batch_size=4", "train.max_steps=2", *TINY])  # fmt: skip
    checkpoint = tmp_path / "base" / "last.pt"
    single, double = tmp_path / "one.json", tmp_path / "two.json"
    assert main(["eval", "--checkpoint", str(checkpoint), "--output", str(single), "data.num_val=7"]) == 0
    run(torchrun("eval", "--checkpoint", str(checkpoint), "--output", str(double), "data.num_val=7"))
    one, two = json.loads(single.read_text()), json.loads(double.read_text())
    assert one["confusion"] == two["confusion"]
    assert np.asarray(two["confusion"]).sum() == 7 * 64 * 64 - ignored(7)  # every pixel counted once


def ignored(num_val):
    """Ignored pixels of the first ``num_val`` synthetic val images."""
    return sum(int((render_scene(seed=0, split="val", index=i, height=64, width=64)[1] == 255).sum())
               for i in range(num_val))  # fmt: skip


MINING = [
    "augment.crop=[48,48]", "augment.scale=[0.75,1.25]", "mining.hard_crop_prob=0.4", "mining.rare_crop_prob=0.4",
    "mining.sampler=class", "mining.start_epoch=2", "ohem.mode=topk", "ohem.class_min_kept=0.1",
    "mining.paste_prob=0.3", "mining.class_weight_power=1",
]  # fmt: skip


@pytest.mark.parametrize("extra", [[], MINING], ids=["plain", "online-mining"])
def test_kill_and_resume_under_torchrun_continues_exactly(tmp_path, extra):
    """With online mining, crops and draws follow the dictionary merged across ranks after each
    epoch; a resume restores it, so the continued run matches the uninterrupted one exactly."""
    args = ["data.batch_size=4", *TINY, "train.epochs=3", *extra]
    run(torchrun("train", f"run.output_dir={tmp_path}", "run.name=straight", *args))
    killed = tmp_path / "killed"
    process = subprocess.Popen(torchrun("train", f"run.output_dir={tmp_path}", "run.name=killed", *args),
                               env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while not (killed / "last.pt").exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # torchrun and both workers
    process.wait()
    epoch = load_checkpoint(killed / "last.pt")["progress"]["epoch"]
    assert epoch < 3, "the run finished before it could be killed"
    run(torchrun("train", "--resume", str(killed)))
    a, b = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(killed / "last.pt")
    assert b["progress"] == a["progress"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    bank_a, bank_b = load_bank(tmp_path / "straight" / "hard_pixels.sqlite"), load_bank(killed / "hard_pixels.sqlite")
    assert {k: s.seen for k, s in bank_a.samples.items()} == {k: s.seen for k, s in bank_b.samples.items()}
    if extra:  # the logged crop shares count both ranks' crops: 16 draws an epoch, 8 on each rank
        epochs = [json.loads(line) for line in (tmp_path / "straight" / "epochs.jsonl").read_text().splitlines()]
        assert [row["train/crops"] for row in epochs] == [16, 16, 16]
        # the recall weights of epoch 3 come from epoch 2's misses summed over both ranks (the store's)
        del bank_a.epochs[2]
        names = [key for key in epochs[2] if key.startswith("train/class_weight/")]
        np.testing.assert_allclose([epochs[2][key] for key in names], recall_weights(bank_a, power=1.0), rtol=1e-6)


def test_gradient_accumulation_under_torchrun_steps_once_per_group(tmp_path):
    run(torchrun("train", f"run.output_dir={tmp_path}", "run.name=acc", "data.batch_size=2", "optim.accumulate=2",
                 *TINY, "train.epochs=1"))  # fmt: skip
    checkpoint = load_checkpoint(tmp_path / "acc" / "last.pt")
    assert checkpoint["progress"]["step"] == 2  # 16 images / (2 processes x 2 images) / 2 micro-batches
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values() if t.is_floating_point())
