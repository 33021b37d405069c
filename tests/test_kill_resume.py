"""kill -9 at seeded random moments of a real training process, then resume until it finishes:
the run folder must end identical to an uninterrupted run's, best.pt included."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from segohem.bank_store import load_bank
from segohem.engine.checkpoint import load_checkpoint

ARGS = [
    "run.device=cpu", "data.num_train=8", "data.num_val=4", "data.image_size=[64,64]", "data.batch_size=4",
    "data.val_batch_size=4", "train.epochs=4", "train.progress=false", "train.num_panels=1", "train.num_bank_rows=2",
]  # fmt: skip
TIMING_KEYS = ("train/epoch_seconds", "train/images_per_s")


def train_command(tmp_path, name, *, resume):
    base = [sys.executable, "-m", "segohem.cli", "train"]
    if resume:
        return [*base, "--resume", str(tmp_path / name)]
    return [*base, f"run.output_dir={tmp_path}", f"run.name={name}", *ARGS]


def environment():
    return {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def run_killed(tmp_path, name, delays):
    """Start, kill -9 after each delay, resume (or restart when no checkpoint exists yet), finish.

    Returns how many kills landed before the process had finished by itself.
    """
    kills = 0
    for delay in [*delays, None]:
        resume = (tmp_path / name / "last.pt").exists()
        process = subprocess.Popen(train_command(tmp_path, name, resume=resume), env=environment(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        try:
            _, err = process.communicate(timeout=delay or 300)
        except subprocess.TimeoutExpired:
            if delay is None:
                raise
            process.send_signal(signal.SIGKILL)
            process.communicate()
            kills += 1
            continue
        assert process.returncode == 0, err.decode()[-2000:]
        if delay is not None:  # finished before the kill: nothing left to resume
            break
    return kills


def records(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def assert_same_checkpoint(a, b):
    for key in ("model", "scheduler", "progress", "metrics", "class_names", "config"):
        if key == "model":
            assert a[key].keys() == b[key].keys()
            assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
        elif key == "metrics":
            strip = {k: v for k, v in a[key].items() if k not in TIMING_KEYS}
            assert strip == {k: v for k, v in b[key].items() if k not in TIMING_KEYS}
        elif key == "config":
            assert {**a[key], "run": None} == {**b[key], "run": None}
        else:
            assert a[key] == b[key], key
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(state_a[i]["exp_avg"], state_b[i]["exp_avg"]) for i in state_a)


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_matches_an_uninterrupted_run(tmp_path):
    started = time.monotonic()
    subprocess.run(train_command(tmp_path, "straight", resume=False), env=environment(), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    seconds = time.monotonic() - started  # start-up (imports) takes about half of it
    rng = random.Random(20261128)
    delays = [rng.uniform(0.5 * seconds, 0.95 * seconds) for _ in range(3)]
    kills = run_killed(tmp_path, "killed", delays)
    assert kills >= 1, "no kill landed: the run finished before the first delay"
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for name in ("last.pt", "best.pt"):
        assert_same_checkpoint(load_checkpoint(straight / name), load_checkpoint(killed / name))
    for name in ("metrics.jsonl", "epochs.jsonl"):
        assert records(straight / name) == records(killed / name), name
    bank_a, bank_b = load_bank(straight / "hard_pixels.sqlite"), load_bank(killed / "hard_pixels.sqlite")
    assert bank_a.samples.keys() == bank_b.samples.keys()
    for key, stats in bank_a.samples.items():
        assert np.array_equal(stats.confusion, bank_b.samples[key].confusion)
        assert np.allclose(stats.hardness, bank_b.samples[key].hardness, equal_nan=True)
    assert not list(killed.glob(".*.tmp")), "a temporary file of an interrupted write was left behind"
