"""The CamVid benchmark runner: the commands it builds and the paired table it prints."""

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("camvid_benchmark")


def arguments(tmp_path: Path) -> argparse.Namespace:
    return argparse.Namespace(runs=tmp_path / "runs", data_root=tmp_path / "camvid", weights=tmp_path / "w.pth")


def test_refinement_on_the_topk_base_mines_and_refines_that_run(bench, tmp_path):
    args = arguments(tmp_path)
    with pytest.raises(FileNotFoundError, match="run the topk method for seed 1 first"):
        bench.commands_for("refine-classsample@topk", 1, args)
    base = args.runs / "topk-s1"
    base.mkdir(parents=True)
    (base / "epoch015.pt").touch()
    commands, definition = bench.commands_for("refine-classsample@topk", 1, args)
    mine, refine = bench.with_settings(commands, ["data.num_workers=2"])
    assert mine[mine.index("--checkpoint") + 1] == str(base / "epoch015.pt")
    assert refine[refine.index("--run") + 1] == str(base)
    assert "run.name=refine-classsample@topk-s1" in refine and "refine.sampler=class" in refine
    assert mine[-1] == refine[-1] == "data.num_workers=2"
    assert definition[0] == "from topk epoch015.pt"
    (base / "mined_train_epoch015.sqlite").touch()  # mined once: later stages only refine
    assert len(bench.commands_for("refine-head@topk", 1, args)[0]) == 1


def test_summary_pairs_each_method_with_the_same_seed(bench, tmp_path):
    classes = ["road", *bench.RARE_CLASSES]

    def write(method: str, seed: int, miou: float, rare: float, epochs: int = 16) -> None:
        iou = {c: (rare if c in bench.RARE_CLASSES else 0.9) for c in classes}
        record = {"method": method, "seed": seed, "final_miou": miou, "final_iou": iou, "train_seconds": 60.0,
                  "epochs": epochs}  # fmt: skip
        (tmp_path / f"{method}-s{seed}.json").write_text(json.dumps(record))

    write("plain", 0, 0.60, 0.30)
    write("plain", 1, 0.64, 0.30)
    write("topk", 0, 0.61, 0.36)
    write("topk", 1, 0.66, 0.34)
    write("refine-classsample@topk", 1, 0.67, 0.40)  # seed 0 missing: paired on seed 1 only
    main_table = bench.summarize(tmp_path).split("Per-class")[0]
    rows = {line.split(" | ")[0].strip("| "): line for line in main_table.splitlines()}
    assert "+1.00 +2.00 (mean +1.50)" in rows["topk"]  # vs plain CE, per seed
    assert "+6.00 +4.00 (mean +5.00)" in rows["topk"]  # rare-class IoU vs plain CE
    assert "+3.00 (mean +3.00)" in rows["refine-classsample@topk"]  # vs plain, seed 1
    assert "+1.00 (mean +1.00)" in rows["refine-classsample@topk"]  # vs top-k, seed 1
    # a method outside the protocol (more epochs) is listed but never paired
    write("combo-c-long", 0, 0.70, 0.40, epochs=32)
    main_table = bench.summarize(tmp_path).split("Per-class")[0]
    rows = {line.split(" | ")[0].strip("| "): line for line in main_table.splitlines()}
    assert "not paired: 32 epochs" in rows["combo-c-long"] and "mean" not in rows["combo-c-long"]
    per_run = bench.summarize(tmp_path).split("Per run")[1]
    assert "| topk | 1 | 66.00 | +2.00 | +0.00 | 34.0 |" in per_run  # pole, the first rare class
    assert "| combo-c-long | 0 | 70.00 | - | - |" in per_run
    # as is one that changes the augmentation or the evaluation, though it trains as many epochs
    record = json.loads((tmp_path / "topk-s0.json").read_text())
    record.update(method="combo-c-2x", definition=bench.FULL_METHODS["combo-c-2x"])
    (tmp_path / "combo-c-2x-s0.json").write_text(json.dumps(record))
    main_table = bench.summarize(tmp_path).split("Per-class")[0]
    rows = {line.split(" | ")[0].strip("| "): line for line in main_table.splitlines()}
    assert "not paired: augment.scale=[1.5,3.0], eval.scales=[2.0]" in rows["combo-c-2x"]
    assert "mean" not in rows["combo-c-2x"]


def test_hard_duplicate_nms_suppresses_overlapping_masks_keeping_the_hardest():
    module = load_script("hard_duplicates")
    masks = np.zeros((4, 10, 10), dtype=bool)
    masks[0, :5] = True  # rows 0-4
    masks[1, :4] = True  # rows 0-3: IoU 0.8 with image 0
    masks[2, 5:] = True  # disjoint from image 0
    masks[3, :3] = True  # IoU 0.6 with image 0, 0.75 with image 1
    iou = module.pairwise_iou(masks)
    assert np.allclose(np.diag(iou), 1) and iou[0, 1] == pytest.approx(0.8) and iou[0, 2] == 0
    assert iou[0, 3] == pytest.approx(0.6) and iou[1, 3] == pytest.approx(0.75)
    # image 1 is the hardest: it suppresses 0 (0.8) and 3 (0.75); 2 is disjoint and stays
    assert sorted(module.greedy_nms(np.array([0.5, 0.9, 0.1, 0.2]), iou, 0.7).tolist()) == [1, 2]
    # image 0 the hardest: suppresses 1 only; 3 overlaps 0 at 0.6 and stays
    assert sorted(module.greedy_nms(np.array([0.9, 0.5, 0.1, 0.2]), iou, 0.7).tolist()) == [0, 2, 3]


def test_a_result_records_the_commit_its_run_started_on(bench, tmp_path, monkeypatch):
    args = argparse.Namespace(protocol="full", runs=tmp_path / "runs", results=tmp_path / "results", set=[],
                              threads=1, data_root=tmp_path / "camvid", weights=tmp_path / "w.pth")  # fmt: skip

    def fake_train(command, **kwargs):  # a finished run folder, as `segohem train` leaves it
        run_dir = args.runs / "topk-s0"
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "epochs.jsonl").write_text(
            json.dumps({"epoch": 16, "val/miou": 0.6, "val/iou/road": 0.9, "train/epoch_seconds": 10.0}) + "\n"
        )

    monkeypatch.setattr(bench.subprocess, "run", fake_train)
    monkeypatch.setattr(bench, "provenance", lambda: {"commit": "started-here", "cpu": "c", "gpu": "none"})
    first = json.loads(bench.run_one("topk", 0, args).read_text())
    assert first["commit"] == "started-here" and first["definition"] == bench.FULL_METHODS["topk"]
    # interrupted before its result was written, resumed later from another commit
    (args.results / "topk-s0.json").unlink()
    monkeypatch.setattr(bench, "provenance", lambda: {"commit": "resumed-here", "cpu": "c", "gpu": "none"})
    assert json.loads(bench.run_one("topk", 0, args).read_text())["commit"] == "started-here"


@pytest.mark.parametrize("protocol", ["half", "full"])
def test_every_method_loads_as_a_config(bench, tmp_path, protocol):
    # a mistyped key or value in a method's definition fails here, not an hour into the grid
    # (checks that need the dataset, e.g. the class count, run only when a run starts)
    from segohem.config import load_config

    args = arguments(tmp_path)
    args.protocol = protocol
    config_name, methods = bench.PROTOCOLS[protocol]
    for method in methods:
        [command], _ = bench.commands_for(method, 0, args)
        overrides = command[command.index(str(bench.ROOT / "configs" / config_name)) + 1 :]
        cfg = load_config(bench.ROOT / "configs" / config_name, overrides)
        assert cfg.run.name == f"{method}-s0", method


@pytest.mark.skipif(not hasattr(signal, "SIGPIPE"), reason="no SIGPIPE on this platform")
def test_a_summary_whose_reader_goes_away_ends_without_a_traceback():
    # `camvid_benchmark.py --summary | head -3`: the pipe's reader is gone before the table is written
    script = Path(__file__).resolve().parents[1] / "scripts" / "camvid_benchmark.py"
    results = Path(__file__).resolve().parents[1] / "docs" / "results" / "camvid-full"
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, str(script), "--protocol", "full", "--summary", "--results", str(results)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (-signal.SIGPIPE, "")


def test_compare_results_tells_identical_reruns_from_changed_ones(tmp_path):
    compare = load_script("compare_results").compare
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    record = {"final_miou": 0.6, "final_iou": {"road": 0.9, "pole": 0.3}, "commit": "1515b4f0", "cpu": "X"}
    (first / "topk-s0.json").write_text(json.dumps(record))
    (second / "topk-s0.json").write_text(json.dumps({**record, "commit": "abcdef12"}))
    changed = {**record, "final_miou": 0.61, "final_iou": {"road": 0.9, "pole": 0.32}}
    (first / "plain-s1.json").write_text(json.dumps(record))
    (second / "plain-s1.json").write_text(json.dumps(changed))
    (first / "quota-s0.json").write_text(json.dumps(record))  # in one folder only: not listed
    assert compare(first, second) == [
        "plain-s1.json: 1515b4f 60.00 | 1515b4f 61.00 | largest class gap 2.00 (pole) | X / X",
        "topk-s0.json: 1515b4f 60.00 | abcdef1 60.00 | bit-identical | X / X",
    ]
