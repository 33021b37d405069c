import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from segohem import bank as bank_module
from segohem.bank import EpochClassStats, HardPixelBank
from segohem.bank_report import class_hardness, confused_pairs, format_rows, hardest_images
from segohem.bank_store import load_bank, load_mined, read_meta, save_bank, save_mined
from segohem.config import load_config
from segohem.data import build_dataset
from tests.test_ohem import asks_the_host

CLASSES = ("a", "b", "c")


def identity_coords(n, h, w):
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([rows, cols]).float().expand(n, 2, h, w), torch.tensor([[h, w]] * n)


def update(bank, *, hard, loss, target, pred, sample_ids=("x",), epoch=0):
    n, h, w = hard.shape
    source_yx, source_hw = identity_coords(n, h, w)
    bank.update(
        sample_ids=list(sample_ids), hard_mask=hard, pixel_loss=loss, target=target, pred=pred,
        source_yx=source_yx, source_hw=source_hw, epoch=epoch,
    )  # fmt: skip


def test_update_arithmetic_by_hand():
    bank = HardPixelBank(3, cell_size=2, momentum=0.5)
    target = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 255, 255], [2, 2, 255, 255]]])
    pred = torch.tensor([[[0, 1, 1, 1], [0, 0, 0, 1], [1, 2, 0, 0], [2, 2, 0, 0]]])
    hard = torch.zeros(1, 4, 4, dtype=torch.bool)
    hard[0, 0, 1] = hard[0, 1, 2] = hard[0, 2, 0] = hard[0, 0, 0] = True
    loss = torch.full((1, 4, 4), 0.1)
    loss[hard] = torch.tensor([1.0, 2.0, 3.0, 2.0])
    update(bank, hard=hard, loss=loss, target=target, pred=pred)
    s = bank.samples["x"]
    assert s.seen == 1 and s.ema_kept_fraction == pytest.approx(4 / 12) and s.ema_hard_loss == pytest.approx(2.0)
    # hard pixels: (0,0) a->a, (0,1) a->b, (1,2) b->a, (2,0) c->b
    assert s.dense_confusion().tolist() == [[1, 1, 0], [1, 0, 0], [0, 1, 0]]
    assert s.confusion_pairs.tolist() == [0, 1, 3, 7] and s.confusion_counts.tolist() == [1, 1, 1, 1]
    assert s.hard_positives().tolist() == [2, 1, 1] and s.hard_negatives().tolist() == [1, 2, 0]
    np.testing.assert_allclose(s.hardness, [[0.5, 0.25], [0.25, np.nan]])
    assert bank.epochs[0].hard.tolist() == [2, 1, 1] and bank.epochs[0].valid.tolist() == [4, 4, 4]
    # missed: hard and predicted as another class, (0,1) a->b, (1,2) b->a, (2,0) c->b; (0,0) a->a is not
    assert bank.epochs[0].missed.tolist() == [1, 1, 1]
    np.testing.assert_allclose(bank.epochs[0].missed_fraction(), [0.25, 0.25, 0.25])
    # second observation: nothing hard; EMAs halve, cell sums decay by momentum
    update(bank, hard=torch.zeros_like(hard), loss=loss, target=target, pred=pred, epoch=1)
    assert s.seen == 2 and s.ema_kept_fraction == pytest.approx(2 / 12) and s.ema_hard_loss == pytest.approx(1.0)
    np.testing.assert_allclose(s.hardness, [[1 / 6, 0.5 / 6], [0.5 / 6, np.nan]])
    assert bank.epochs[1].hard.tolist() == [0, 0, 0] and bank.epochs[1].missed.tolist() == [0, 0, 0]


def test_state_dict_round_trip(tmp_path):
    bank = HardPixelBank(3, cell_size=2)
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (2, 6, 6), generator=gen)
    update(bank, hard=torch.rand(2, 6, 6, generator=gen) > 0.5, loss=torch.rand(2, 6, 6, generator=gen),
           target=target, pred=torch.randint(0, 3, (2, 6, 6), generator=gen), sample_ids=("p", "q"))  # fmt: skip
    torch.save({"bank": bank.state_dict()}, tmp_path / "ck.pt")
    restored = HardPixelBank(1)
    restored.load_state_dict(torch.load(tmp_path / "ck.pt", weights_only=False)["bank"])
    assert restored.samples.keys() == bank.samples.keys()
    for key in bank.samples:
        a, b = bank.samples[key], restored.samples[key]
        assert a.seen == b.seen and a.ema_hard_loss == b.ema_hard_loss
        assert np.array_equal(a.hard_acc, b.hard_acc) and np.array_equal(a.dense_confusion(), b.dense_confusion())
    assert np.array_equal(restored.epochs[0].hard, bank.epochs[0].hard)
    assert np.array_equal(restored.epochs[0].missed, bank.epochs[0].missed) and bank.epochs[0].missed.sum() > 0
    state = bank.state_dict()
    state["epochs"][0].pop("missed")  # a checkpoint saved before misses were counted
    restored.load_state_dict(state)
    assert restored.epochs[0].missed is None
    # more of that epoch: still not counted, rather than a partial count
    update(restored, hard=torch.ones(1, 6, 6, dtype=torch.bool), loss=torch.ones(1, 6, 6), target=target[:1],
           pred=target[:1], sample_ids=("p",))  # fmt: skip
    assert restored.epochs[0].missed is None


def test_known_hard_region_lands_in_the_right_cells_under_crop_scale_and_flip():
    cfg = load_config(
        None,
        ["data.image_size=[96, 128]", "augment.scale=[0.6, 1.4]", "augment.crop=[64, 64]", "augment.hflip=0.5"],
    )
    dataset = build_dataset(cfg.data, cfg.augment, split="train", train=True, seed=0)
    region = np.zeros((96, 128), bool)
    region[16:40, 8:48] = True  # the hard region, in original coordinates (off-centre: flips matter)
    bank = HardPixelBank(7, cell_size=8)
    for epoch in range(30):
        dataset.set_epoch(epoch)
        sample = dataset[0]
        yx = sample["source_yx"].long()
        valid = sample["mask"] != 255
        hard = torch.from_numpy(region)[yx[0].clamp(0, 95), yx[1].clamp(0, 127)] & valid
        bank.update(
            sample_ids=["s"], hard_mask=hard[None], pixel_loss=hard[None].float(), target=sample["mask"][None],
            pred=sample["mask"][None], source_yx=sample["source_yx"][None], source_hw=sample["source_hw"][None],
            epoch=epoch,
        )  # fmt: skip
    hardness = bank.samples["s"].hardness  # (12, 16) cells of 8x8
    inside = region.reshape(12, 8, 16, 8).all(axis=(1, 3))
    outside = ~region.reshape(12, 8, 16, 8).any(axis=(1, 3))
    seen = ~np.isnan(hardness)
    assert seen[inside].mean() > 0.8 and seen[outside].mean() > 0.5  # crops covered most of the image
    assert np.all(hardness[inside & seen] == 1.0)
    assert np.all(hardness[outside & seen] == 0.0)


def filled_bank():
    bank = HardPixelBank(3, cell_size=4)
    target = torch.tensor([[[0, 1], [2, 2]], [[1, 1], [1, 1]]]).repeat_interleave(4, 1).repeat_interleave(4, 2)
    pred = torch.zeros_like(target)
    hard = target > 0
    update(bank, hard=hard, loss=hard.float() * 2, target=target, pred=pred, sample_ids=("img1", "img2"))
    return bank


def update_img1(bank):
    """Every pixel of img1 hard, of class b, called a: confusion[1, 0] grows by 64."""
    target = torch.ones(1, 8, 8, dtype=torch.long)
    hard = torch.ones(1, 8, 8, dtype=torch.bool)
    update(bank, hard=hard, loss=hard.float(), target=target, pred=target * 0, sample_ids=("img1",), epoch=0)


def test_load_state_dict_copies_so_the_loaded_bank_and_its_source_stay_apart():
    source = filled_bank()
    state = source.state_dict()
    confusion, hard_acc = source.samples["img1"].dense_confusion(), source.samples["img1"].hard_acc.copy()
    counts = source.samples["img1"].confusion_counts.copy()
    epoch_hard = source.epochs[0].hard.copy()
    loaded = HardPixelBank(1)
    loaded.load_state_dict(state)
    update_img1(loaded)
    assert loaded.samples["img1"].dense_confusion()[1, 0] == confusion[1, 0] + 64  # the update did land
    assert np.array_equal(source.samples["img1"].dense_confusion(), confusion)
    for arrays in (vars(source.samples["img1"]), state["samples"]["img1"]):
        assert np.array_equal(arrays["confusion_counts"], counts) and np.array_equal(arrays["hard_acc"], hard_acc)
    assert np.array_equal(source.epochs[0].hard, epoch_hard) and np.array_equal(state["epochs"][0]["hard"], epoch_hard)


def test_state_dict_is_a_snapshot_that_later_updates_leave_alone():
    bank = filled_bank()
    state = bank.state_dict()
    counts, epoch_hard = state["samples"]["img1"]["confusion_counts"].copy(), state["epochs"][0]["hard"].copy()
    confusion = bank.samples["img1"].dense_confusion()
    update_img1(bank)
    assert bank.samples["img1"].dense_confusion()[1, 0] == confusion[1, 0] + 64
    assert np.array_equal(state["samples"]["img1"]["confusion_counts"], counts)
    assert np.array_equal(state["epochs"][0]["hard"], epoch_hard)


def test_store_round_trip_and_queries(tmp_path):
    path = tmp_path / "bank.sqlite"
    bank = filled_bank()
    save_bank(bank, path, class_names=CLASSES, epoch=1)
    restored = load_bank(path)
    for key, stats in bank.samples.items():
        np.testing.assert_allclose(restored.samples[key].hardness, stats.hardness, rtol=1e-3)
        assert np.array_equal(restored.samples[key].dense_confusion(), stats.dense_confusion())
    assert read_meta(path)["class_names"] == list(CLASSES)
    top = hardest_images(path)
    assert [r["sample_id"] for r in top] == ["img2", "img1"]  # all 64 pixels hard vs 48 of 64
    by_class = hardest_images(path, class_name="c")
    assert [r["sample_id"] for r in by_class] == ["img1"] and by_class[0]["hard_c_pixels"] == 32
    pairs = confused_pairs(path)
    assert pairs == [
        {"true": "b", "predicted": "a", "hard_pixels": 80, "images": 2},
        {"true": "c", "predicted": "a", "hard_pixels": 32, "images": 1},
    ]
    history = class_hardness(path)
    assert {(r["class"], r["hard_fraction"]) for r in history} == {("a", 0.0), ("b", 1.0), ("c", 1.0)}
    for row in history:
        c = CLASSES.index(row["class"])
        assert row["missed_pixels"] == bank.epochs[row["epoch"]].missed[c]
        assert row["missed_fraction"] == row["missed_pixels"] / row["valid_pixels"]
    assert {r["class"]: r["missed_pixels"] for r in history} == {"a": 0, "b": 80, "c": 32}  # every wrong hard pixel
    assert "sample_id" in format_rows(top, "csv").splitlines()[0]
    with pytest.raises(ValueError, match="unknown class 'z'"):
        hardest_images(path, class_name="z")


def test_mined_masks_are_exact_and_small(tmp_path):
    path = tmp_path / "mined.sqlite"
    gen = np.random.default_rng(0)
    yy, xx = np.mgrid[:360, :480]
    loss = (np.sin(yy / 20.0) + np.cos(xx / 30.0) + 2).astype(np.float32) * 1.5 + gen.random((360, 480)) * 0.01
    hard = loss > 4.0
    save_mined(path, [("frame", hard, loss)])
    mask, loss_back = load_mined(path, "frame")
    assert np.array_equal(mask, hard)
    np.testing.assert_allclose(loss_back, loss, rtol=0.04, atol=0.02)
    assert path.stat().st_size < 200_000


def test_a_kill_during_a_save_leaves_the_previous_state_readable(tmp_path):
    path = tmp_path / "bank.sqlite"
    save_bank(filled_bank(), path, class_names=CLASSES, epoch=1)
    script = textwrap.dedent(f"""
        import os, signal
        from contextlib import contextmanager
        import numpy as np
        from segohem import bank_store
        from segohem.bank import HardPixelBank, SampleStats

        real_connect = bank_store.connect

        class KillAfterSamples:
            def __init__(self, db):
                self.db = db
            def execute(self, *args):
                return self.db.execute(*args)
            def executemany(self, sql, rows):
                self.db.executemany(sql, rows)
                if sql.startswith("INSERT INTO samples"):
                    os.kill(os.getpid(), signal.SIGKILL)  # die in the middle of the transaction

        @contextmanager
        def connect(path):
            with real_connect(path) as db:
                yield KillAfterSamples(db)

        bank_store.connect = connect
        bank = HardPixelBank(3, cell_size=4)
        for i in range(50):
            bank.samples[f"new{{i}}"] = SampleStats(
                height=4, width=4, hard_acc=np.ones((1, 1), np.float32), seen_acc=np.ones((1, 1), np.float32),
                num_classes=3, confusion_pairs=np.zeros(0, np.int32), confusion_counts=np.zeros(0, np.int64),
                seen=1)
        bank_store.save_bank(bank, {str(path)!r}, class_names=("a", "b", "c"), epoch=2)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == -9, result.stderr
    assert read_meta(path)["epoch"] == "1"
    restored = load_bank(path)
    assert sorted(restored.samples) == ["img1", "img2"]


def reference_update(bank, *, sample_ids, hard_mask, pixel_loss, target, pred, source_yx, source_hw, epoch):
    """The per-image update that the batched one replaced, written out plainly (numpy, one image at a time)."""
    num_classes, cell = bank.num_classes, bank.cell_size
    for i, sample_id in enumerate(sample_ids):
        height, width = (int(v) for v in source_hw[i])
        grid_h, grid_w = math.ceil(height / cell), math.ceil(width / cell)
        tracked = source_yx[i, 0].numpy() >= 0  # a negative row: a pixel from another image (NaN: ignored)
        valid = ((target[i] >= 0) & (target[i] < num_classes)).numpy() & tracked
        hard = hard_mask[i].numpy() & tracked
        cells = np.floor(np.nan_to_num(source_yx[i].float().numpy()) / cell).astype(np.int64)  # NaN: ignored
        cell_index = np.clip(cells[0], 0, grid_h - 1) * grid_w + np.clip(cells[1], 0, grid_w - 1)
        seen = np.bincount(cell_index[valid], minlength=grid_h * grid_w).reshape(grid_h, grid_w)
        hard_cells = np.bincount(cell_index[valid & hard], minlength=grid_h * grid_w).reshape(grid_h, grid_w)
        stats = bank._get(sample_id, height, width)
        observed = seen > 0
        stats.hard_acc[observed] = bank.momentum * stats.hard_acc[observed] + hard_cells[observed]
        stats.seen_acc[observed] = bank.momentum * stats.seen_acc[observed] + seen[observed]
        true_class = target[i].clamp(0, num_classes - 1).numpy()[hard]
        confusion = np.zeros((num_classes, num_classes), np.int64)
        np.add.at(confusion, (true_class, pred[i].clamp(0, num_classes - 1).numpy()[hard]), 1)
        stats.add_confusion(confusion)
        num_kept = int(hard.sum())
        counted = hard_mask & (source_yx[:, 0] >= 0)
        hard_loss_sum = float((pixel_loss.float() * counted).flatten(1).sum(1)[i])
        weight = bank.momentum if stats.seen else 0.0
        stats.ema_kept_fraction = weight * stats.ema_kept_fraction + (1 - weight) * num_kept / max(1, int(valid.sum()))
        stats.ema_hard_loss = weight * stats.ema_hard_loss + (1 - weight) * hard_loss_sum / max(1, num_kept)
        stats.seen += 1
        stats.last_epoch = epoch
        history = bank._epochs.setdefault(epoch, EpochClassStats.empty(num_classes))
        history.hard += np.bincount(true_class, minlength=num_classes)
        wrong = true_class != pred[i].clamp(0, num_classes - 1).numpy()[hard]
        history.missed += np.bincount(true_class[wrong], minlength=num_classes)
        history.valid += np.bincount(target[i].numpy()[valid], minlength=num_classes)


def random_update(gen, *, num_images=3, height=10, width=12, ids="abcde"):
    """Update arguments with crops, rescales, flips, ignored pixels, out-of-range coordinates and
    negative rows (pixels pasted from another image, not counted)."""
    picks = torch.randint(0, len(ids), (num_images,), generator=gen).tolist()
    source_hw = torch.tensor([[5 + 7 * p, 39 - 5 * p] for p in picks])  # each image has its own size
    scale = source_hw.float() / torch.tensor([height, width])
    rows, cols = torch.meshgrid(torch.arange(height).float(), torch.arange(width).float(), indexing="ij")
    noise = torch.randn(num_images, 2, 1, 1, generator=gen)
    noise[:, 0] = noise[:, 0].abs()  # columns may fall below 0 (clamped); a negative row means "pasted"
    source_yx = torch.stack([rows, cols]) * scale[:, :, None, None] + noise
    target = torch.randint(0, 4, (num_images, height, width), generator=gen)
    ignored = torch.rand(num_images, height, width, generator=gen) < 0.2
    target[ignored] = 255
    source_yx[:, 0][ignored] = float("nan")  # any value where the target is ignored
    pasted = (torch.rand(num_images, height, width, generator=gen) < 0.1) & ~ignored
    source_yx[:, 0][pasted] = -1.0
    hard = (torch.rand(num_images, height, width, generator=gen) < 0.4) & ~ignored
    return dict(
        sample_ids=[ids[p] for p in picks], hard_mask=hard, pixel_loss=torch.rand(num_images, height, width,
        generator=gen) * 3, target=target, pred=torch.randint(0, 4, (num_images, height, width), generator=gen),
        source_yx=source_yx, source_hw=source_hw, epoch=int(torch.randint(0, 2, (1,), generator=gen)),
    )  # fmt: skip


def assert_same_banks(actual, expected):
    assert actual.samples.keys() == expected.samples.keys()
    for key, stats in expected.samples.items():
        for name, value in vars(stats).items():
            got = getattr(actual.samples[key], name)
            assert np.array_equal(got, value) if isinstance(value, np.ndarray) else got == value, (key, name)
    assert actual.epochs.keys() == expected.epochs.keys()
    for epoch, history in expected.epochs.items():
        assert np.array_equal(actual.epochs[epoch].hard, history.hard)
        assert np.array_equal(actual.epochs[epoch].valid, history.valid)
        assert np.array_equal(actual.epochs[epoch].missed, history.missed)


def test_batched_update_equals_the_per_image_reference():
    gen = torch.Generator().manual_seed(0)
    bank, expected = HardPixelBank(4, cell_size=4, momentum=0.5), HardPixelBank(4, cell_size=4, momentum=0.5)
    for _ in range(30):  # ids repeat across and within batches
        arguments = random_update(gen)
        bank.update(**arguments)
        reference_update(expected, **arguments)
    assert_same_banks(bank, expected)


def test_update_asks_the_host_nothing():
    arguments = random_update(torch.Generator().manual_seed(1))
    bank = HardPixelBank(4, cell_size=4)
    assert asks_the_host(lambda: bank.update(**arguments)) == []


class LaterEvent:
    """Stands in for the CUDA event of a device-to-host copy that lands when the test says."""

    def __init__(self, landed: list[bool]) -> None:
        self.landed, self.waited = landed, False

    def query(self) -> bool:
        return self.landed[0]

    def synchronize(self) -> None:
        self.waited = True


def test_updates_in_flight_fold_in_order_before_any_read(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    batches = [random_update(gen) for _ in range(7)]
    expected = HardPixelBank(4, cell_size=4)
    for arguments in batches:
        reference_update(expected, **arguments)
    landed, events = [False], []

    def send_later(counts):
        events.append(LaterEvent(landed))
        return counts, events[-1]

    monkeypatch.setattr(bank_module, "_send_to_host", send_later)
    bank = HardPixelBank(4, cell_size=4)
    for arguments in batches[:5]:
        bank.update(**arguments)
    assert len(bank._in_flight) == 4 and events[0].waited  # the fifth waited for the oldest
    assert not any(event.waited for event in events[1:])
    landed[0] = True
    bank.update(**batches[5])  # everything landed folds, in order
    assert not bank._in_flight
    landed[0] = False
    bank.update(**batches[6])
    state = bank.state_dict()  # a read waits for what is still in flight
    assert events[-1].waited and not bank._in_flight
    assert_same_banks(bank, expected)
    restored = HardPixelBank(1)
    restored.load_state_dict(state)
    assert_same_banks(restored, expected)


def test_sparse_confusion_equals_a_dense_reference_at_150_classes():
    """Random updates over a few of 150 classes: the sparse entries give exactly the dense sums."""
    num_classes, gen = 150, torch.Generator().manual_seed(3)
    bank, dense = HardPixelBank(num_classes, cell_size=4), {}
    for _ in range(20):
        arguments = random_update(gen)
        classes = torch.randperm(num_classes, generator=gen)[:6]  # each batch meets its own few classes
        arguments["target"] = torch.where(arguments["target"] == 255, 255, classes[arguments["target"] % 6])
        arguments["pred"] = classes[arguments["pred"]]
        bank.update(**arguments)
        for i, sample_id in enumerate(arguments["sample_ids"]):
            hard = arguments["hard_mask"][i] & (arguments["source_yx"][i, 0] >= 0)  # pasted pixels: not counted
            matrix = dense.setdefault(sample_id, np.zeros((num_classes, num_classes), np.int64))
            np.add.at(matrix, (arguments["target"][i][hard].numpy(), arguments["pred"][i][hard].numpy()), 1)
    assert bank.samples.keys() == dense.keys()
    for sample_id, matrix in dense.items():
        stats = bank.samples[sample_id]
        assert np.array_equal(stats.dense_confusion(), matrix)
        assert np.array_equal(stats.hard_positives(), matrix.sum(1))
        assert np.array_equal(stats.hard_negatives(), matrix.sum(0) - np.diag(matrix))
        assert np.all(np.diff(stats.confusion_pairs) > 0) and np.all(stats.confusion_counts > 0)
    restored = HardPixelBank(1)
    restored.load_state_dict(bank.state_dict())
    assert_same_banks(restored, bank)


def test_state_is_small_at_150_classes():
    """A 64x64 image with a few confused pairs costs its maps and a few entries, not a 180 kB (C, C) matrix."""
    bank = HardPixelBank(150, cell_size=8)
    target = torch.tensor([3, 70, 149]).repeat_interleave(22)[:64].view(1, 64, 1).expand(1, 64, 64).contiguous()
    pred = torch.where(torch.arange(64) % 3 == 0, 12, target)  # (1, 64, 64): some pixels called class 12
    hard = torch.rand(1, 64, 64, generator=torch.Generator().manual_seed(4)) < 0.5
    for _ in range(3):
        update(bank, hard=hard, loss=hard.float(), target=target, pred=pred, sample_ids=("x",))
    arrays = [v for v in bank.state_dict()["samples"]["x"].values() if isinstance(v, np.ndarray)]
    assert len(bank.samples["x"].confusion_pairs) == 6  # 3 classes, each right and called 12
    assert sum(a.nbytes for a in arrays) == 2 * 8 * 8 * 4 + 6 * (4 + 8)  # hard_acc, seen_acc and 6 entries


def test_a_saved_dense_confusion_loads_as_sparse():
    """A bank state from before the confusion was sparse holds a (C, C) ``confusion``; it loads the same."""
    bank = filled_bank()
    state = bank.state_dict()
    for key, fields in state["samples"].items():
        dense_fields = {k: v for k, v in fields.items() if not k.startswith("confusion_") and k != "num_classes"}
        state["samples"][key] = {**dense_fields, "confusion": bank.samples[key].dense_confusion()}
    restored = HardPixelBank(1)
    restored.load_state_dict(state)
    assert_same_banks(restored, bank)
