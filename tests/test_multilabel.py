"""Multi-label masks end to end: bit-packed labels, a sigmoid per class, per-class metrics, and a
dictionary of hard positives and hard negatives per class."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from segohem.bank import HardPixelBank
from segohem.bank_report import confused_pairs, hardest_images
from segohem.bank_store import load_bank, read_meta, save_bank
from segohem.cli import main
from segohem.config import ConfigError, load_config
from segohem.data import class_info
from segohem.data.build import build_dataset
from segohem.data.errors import DatasetError
from segohem.data.labels import pack_multilabel
from segohem.engine.checkpoint import load_checkpoint
from segohem.engine.inference import infer_logits
from segohem.engine.run import build_loss, checkpoint_bank
from segohem.metrics import MultiLabelConfusion
from segohem.ohem import OhemBinaryCrossEntropy, PackedMultiLabel, unpack_labels
from segohem.visualize import colorize_multilabel

IGNORE = 255
ROOT = Path(__file__).resolve().parents[1]
NAMES = "data.class_names=[square,bar]"


def write_dataset(root: Path, *, train: int = 8, val: int = 4, size: int = 32) -> None:
    """Images with a square (class 0) and a vertical bar (class 1) that overlap; row 0 ignored."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        for i in range(count):
            image = rng.integers(0, 40, (size, size, 3)).astype(np.uint8)
            square, bar = np.zeros((size, size), bool), np.zeros((size, size), bool)
            y, x = rng.integers(4, size // 2, 2)
            square[y : y + 14, x : x + 14] = True
            column = rng.integers(0, size - 4)
            bar[:, column : column + 4] = True
            image[square, 0] += 150
            image[bar, 1] += 150
            packed = pack_multilabel([square, bar])
            packed[0, :] = IGNORE
            cv2.imwrite(str(root / split / f"{i}.png"), image)
            cv2.imwrite(str(root / f"{split}annot" / f"{i}.png"), packed)


def multilabel_args(root: Path, *extra: str) -> list[str]:
    return [
        f"run.output_dir={root}", "run.name=ml", "data.kind=folder", f"data.root={root / 'data'}",
        "data.mask_format=multilabel", NAMES, "model.encoder=resnet18", "data.batch_size=4", "train.epochs=2",
        "train.progress=false", "ohem.mode=topk", "ohem.top_k=0.5", "ohem.neg_ratio=3", "wandb.mode=disabled",
        *extra,
    ]  # fmt: skip


# --- labels -----------------------------------------------------------------------------------


def test_unpack_reads_one_bit_per_class_and_ignores_every_class_of_an_ignored_pixel():
    packed = torch.tensor([[[0, 1, 2, 3, 5, IGNORE]]])
    unpacked = unpack_labels(packed, num_classes=3, ignore_index=IGNORE)
    assert unpacked.shape == (1, 3, 1, 6)
    assert unpacked[0, :, 0].T.tolist() == [[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [1, 0, 1], [IGNORE] * 3]


def test_a_value_with_a_bit_beyond_the_classes_is_named():
    with pytest.raises(ValueError, match=r"values \[8, 12\] set bits beyond the 3 classes"):
        unpack_labels(torch.tensor([[[1, 8, 12, IGNORE]]]), num_classes=3, ignore_index=IGNORE)


def test_pack_then_unpack_round_trips_and_picks_the_smallest_dtype():
    rng = np.random.default_rng(1)
    masks = [rng.random((5, 7)) < 0.5 for _ in range(3)]
    ignore = rng.random((5, 7)) < 0.2
    packed = pack_multilabel([*masks[:2], None, masks[2]], ignore=ignore)  # a class absent from this image
    assert packed.dtype == np.uint8
    unpacked = unpack_labels(torch.from_numpy(packed.astype(np.int64))[None], num_classes=4, ignore_index=IGNORE)[0]
    expected = np.stack([masks[0], masks[1], np.zeros((5, 7), bool), masks[2]]).astype(np.int64)
    expected[:, ignore] = IGNORE
    assert (unpacked.numpy() == expected).all()
    wide = pack_multilabel([masks[0]] * 9, ignore_index=65535)
    assert wide.dtype == np.uint16 and wide.max() in (0, 511)
    with pytest.raises(ValueError, match=r"ignore id 255 is not above the packed values of 8 classes \(0\.\.255\)"):
        pack_multilabel([masks[0]] * 8)
    with pytest.raises(ValueError, match="16 classes: a 16-bit label map packs 1 to 15"):
        pack_multilabel([masks[0]] * 16, ignore_index=65535)
    with pytest.raises(ValueError, match="ignore id -1"):
        pack_multilabel([masks[0]], ignore_index=-1)
    with pytest.raises(ValueError, match="differ in size"):
        pack_multilabel([masks[0], np.zeros((2, 2), bool)])


def test_pack_script_writes_the_label_maps_training_reads(tmp_path):
    for name, rows in (("square", slice(0, 2)), ("bar", slice(1, 4))):
        (tmp_path / "masks" / name).mkdir(parents=True)
        mask = np.zeros((4, 4), np.uint8)
        mask[rows] = 255
        cv2.imwrite(str(tmp_path / "masks" / name / "a.png"), mask)
    cv2.imwrite(str(tmp_path / "masks" / "square" / "b.png"), np.full((4, 4), 255, np.uint8))  # no bar file
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "pack_multilabel.py"), str(tmp_path / "masks"),
         str(tmp_path / "out"), "--classes", "square", "bar"], capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    a = cv2.imread(str(tmp_path / "out" / "a.png"), cv2.IMREAD_UNCHANGED)
    assert a[:, 0].tolist() == [1, 3, 2, 2]  # square rows 0-1, bar rows 1-3
    assert (cv2.imread(str(tmp_path / "out" / "b.png"), cv2.IMREAD_UNCHANGED) == 1).all()


def test_pack_script_refuses_bad_inputs_before_writing_anything(tmp_path):
    def pack(*extra):
        script = ROOT / "scripts" / "pack_multilabel.py"
        command = [sys.executable, str(script), str(tmp_path / "masks"), str(tmp_path / "new"), *extra]
        return subprocess.run(command, capture_output=True, text=True)

    for name in ("a", "b"):
        (tmp_path / "masks" / name).mkdir(parents=True)
        cv2.imwrite(str(tmp_path / "masks" / name / "x.png"), np.zeros((4, 4), np.uint8))
    done = pack("--classes", "a", "b", "--ignore", str(tmp_path / "typo"))
    assert done.returncode == 2 and f"no folder {tmp_path / 'typo'}" in done.stderr
    done = pack("--classes", *"abcdefghijklmnop", "--ignore-index", "65535")
    assert done.returncode == 2 and "16 classes: a 16-bit label map packs 1 to 15" in done.stderr
    cv2.imwrite(str(tmp_path / "masks" / "a" / "y.png"), np.zeros((4, 4), np.uint8))
    cv2.imwrite(str(tmp_path / "masks" / "b" / "y.png"), np.zeros((5, 4), np.uint8))
    done = pack("--classes", "a", "b")
    assert done.returncode == 1 and "the masks of y differ in size" in done.stderr
    assert f"{tmp_path / 'masks' / 'b' / 'y.png'} 5x4" in done.stderr
    cv2.imwrite(str(tmp_path / "masks" / "b" / "y.png"), np.zeros((4, 4, 3), np.uint8))
    done = pack("--classes", "a", "b")
    assert done.returncode == 1 and "y.png" in done.stderr and "must be a single-channel image" in done.stderr
    assert not (tmp_path / "new").exists()  # x.png was fine, but nothing is written before every stem is


def test_config_checks_classes_ignore_id_and_what_assumes_one_class_per_pixel():
    base = ["data.kind=folder", "data.root=x", "data.mask_format=multilabel"]
    names8 = "data.class_names=[a,b,c,d,e,f,g,h]"
    with pytest.raises(ConfigError, match=r"data\.ignore_index 255 is a label value .* 8 classes .*=65535"):
        class_info(load_config(None, [*base, names8]).data)
    assert class_info(load_config(None, [*base, names8, "data.ignore_index=65535"]).data).multilabel
    with pytest.raises(ConfigError, match="at most 15 classes"):
        names16 = ",".join("c" * (i + 1) for i in range(16))
        class_info(load_config(None, [*base, f"data.class_names=[{names16}]"]).data)
    refused = {"ohem.class_min_kept=0.1": "ohem.class_min_kept", "ohem.region_loss=dice": "ohem.region_loss",
               "ohem.class_weight=[1,2]": "ohem.class_weight", "model.refine_head=8": "model.refine_head",
               "mining.class_weight_power=1": "mining.class_weight_power"}  # fmt: skip
    for override, key in refused.items():
        with pytest.raises(ConfigError, match=rf"{re.escape(key)}: not available with data.mask_format=multilabel"):
            load_config(None, [*base, NAMES, override])
    with pytest.raises(ConfigError, match=r"data\.mask_format=multilabel reads data\.kind=folder"):
        load_config(None, ["data.kind=camvid", "data.root=x", "data.mask_format=multilabel"])
    with pytest.raises(ConfigError, match=r"data\.ignore_index -1: data\.mask_format=multilabel masks are unsigned"):
        class_info(load_config(None, [*base, NAMES, "data.ignore_index=-1"]).data)
    with pytest.raises(ConfigError, match=r"set ohem\.neg_ratio"):
        build_loss(load_config(None, [*base, NAMES, "ohem.mode=topk"]))
    loss = build_loss(load_config(None, [*base, NAMES, "ohem.mode=topk", "ohem.neg_ratio=3"]))
    assert isinstance(loss, PackedMultiLabel)


def test_a_mask_with_a_bit_beyond_the_classes_is_an_error_naming_the_file(tmp_path):
    write_dataset(tmp_path / "data", train=2, val=1)
    cv2.imwrite(str(tmp_path / "data" / "trainannot" / "1.png"), np.full((32, 32), 6, np.uint8))
    cfg = load_config(None, multilabel_args(tmp_path))
    dataset = build_dataset(cfg.data, cfg.augment, split="train", train=False, seed=0)
    assert dataset[0]["mask"].max() == IGNORE
    with pytest.raises(DatasetError, match=r"trainannot/1\.png: label values \[6\] set bits beyond the 2 classes"):
        dataset[1]


def test_training_without_neg_ratio_stops_before_making_the_run_folder(tmp_path, capsys):
    write_dataset(tmp_path / "data", train=2, val=1)
    args = [arg for arg in multilabel_args(tmp_path) if not arg.startswith("ohem.neg_ratio")]
    assert main(["train", *args]) == 2
    assert "set ohem.neg_ratio" in capsys.readouterr().err and not (tmp_path / "ml").exists()


def test_padding_with_a_negative_ignore_id_stays_ignored_in_an_unsigned_mask(tmp_path):
    """A uint8 label map padded with ignore id -1 would read the padding as class 0."""
    (tmp_path / "train").mkdir()
    (tmp_path / "trainannot").mkdir()
    cv2.imwrite(str(tmp_path / "train" / "a.png"), np.zeros((8, 8, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "trainannot" / "a.png"), np.ones((8, 8), np.uint8))
    cfg = load_config(None, ["data.kind=folder", f"data.root={tmp_path}", "data.class_names=[a,b]",
                             "data.ignore_index=-1", "augment.crop=[12,12]", "augment.hflip=0"])  # fmt: skip
    mask = build_dataset(cfg.data, cfg.augment, split="train", train=True, seed=0)[0]["mask"]
    assert (mask == 1).sum() == 64 and (mask == -1).sum() == mask.numel() - 64  # crop and pad_divisor padding


# --- loss, metrics, inference ------------------------------------------------------------------


def test_the_loss_is_binary_ohem_on_the_unpacked_classes():
    torch.manual_seed(0)
    packed = torch.randint(0, 8, (2, 6, 5))
    packed[0, 0] = IGNORE
    logits = torch.randn(2, 3, 6, 5)
    binary = OhemBinaryCrossEntropy(mode="topk", top_k=0.5, neg_ratio=2.0, min_neg=1)
    got = PackedMultiLabel(binary, num_classes=3)(logits, packed)
    want = binary(logits, unpack_labels(packed, num_classes=3, ignore_index=IGNORE))
    assert torch.equal(got.hard_mask, want.hard_mask) and torch.equal(got.loss, want.loss)
    assert got.hard_mask.shape == (2, 3, 6, 5) and not got.hard_mask[0, :, 0].any()


def test_metrics_are_per_class_iou_of_positives_by_hand():
    target = torch.tensor([[[[1, 1, 0, 0, IGNORE]], [[0, 0, 0, 0, 1]]]])  # (1, 2, 1, 5)
    pred = torch.tensor([[[[1, 0, 1, 0, 1]], [[0, 0, 0, 0, 0]]]], dtype=torch.bool)
    confusion = MultiLabelConfusion(2, ignore_index=IGNORE)
    confusion.update(pred, target)
    metrics = confusion.compute()
    # class 0: TP 1, FN 1, FP 1, TN 1 (the ignored pixel is not scored); class 1: FN 1, TN 4
    assert confusion.matrix.tolist() == [[[1, 1], [1, 1]], [[4, 0], [1, 0]]]
    assert metrics["iou"] == [pytest.approx(1 / 3), 0.0]
    assert metrics["miou"] == pytest.approx(1 / 6)
    assert metrics["acc"] == [0.5, 0.0] and metrics["pixel_acc"] == pytest.approx(6 / 9)


def test_test_time_views_average_sigmoids_not_softmaxes():
    class Fixed(torch.nn.Module):  # the same logits for an image and its mirror: every view agrees
        def forward(self, images):
            return torch.stack([torch.full_like(images[:, 0], 2.0), torch.full_like(images[:, 0], -1.0)], 1)

    images = torch.zeros(1, 3, 4, 4)
    multi = infer_logits(Fixed(), images, num_classes=2, flip=True, multilabel=True)
    assert torch.allclose(multi[0, :, 0, 0], torch.tensor([2.0, -1.0]), atol=1e-5)  # logit of the mean sigmoid
    single = infer_logits(Fixed(), images, num_classes=2, flip=True)
    assert single[0, 1, 0, 0] < -3  # a softmax average: class 1 is all but gone, unlike with sigmoids


def test_multilabel_colours_are_the_mean_of_each_pixels_classes():
    palette = [(200, 0, 0), (0, 100, 0), (0, 0, 50)]
    colours = colorize_multilabel(np.array([[0, 1, 3, 7]], np.uint8), palette)
    assert colours[0].tolist() == [[0, 0, 0], [200, 0, 0], [100, 50, 0], [67, 33, 17]]


# --- dictionary ----------------------------------------------------------------------------------


def multilabel_update(bank: HardPixelBank, *, epoch: int = 0) -> None:
    """One 1x4 image, 2 classes: target, prediction and kept entries chosen by hand."""
    target = torch.tensor([[[[1, 1, 0, 0]], [[0, 1, 1, IGNORE]]]])
    pred = torch.tensor([[[[1, 0, 1, 0]], [[1, 1, 0, 0]]]], dtype=torch.bool)
    hard = torch.tensor([[[[1, 1, 1, 0]], [[1, 0, 1, 1]]]], dtype=torch.bool)  # the last is ignored
    source_yx = torch.stack(torch.meshgrid(torch.arange(1.0), torch.arange(4.0), indexing="ij"))[None]
    bank.update(sample_ids=["a"], hard_mask=hard, pixel_loss=hard.float() * 2, target=target, pred=pred,
                source_yx=source_yx, source_hw=torch.tensor([[1, 4]]), epoch=epoch)  # fmt: skip


def test_the_dictionary_counts_hard_positives_and_negatives_per_class_by_hand():
    bank = HardPixelBank(2, cell_size=2, multilabel=True)
    multilabel_update(bank)
    stats = bank.samples["a"]
    # kept: class 0 pixels 0 (pos, said yes), 1 (pos, said no: missed), 2 (neg, said yes: false positive);
    # class 1 pixels 0 (neg, said yes: false positive), 2 (pos, said no: missed); pixel 3 of class 1 ignored
    assert stats.hard_positives().tolist() == [2, 1]
    assert stats.hard_negatives().tolist() == [1, 1]
    dense = stats.dense_confusion()
    assert dense.shape == (2, 2, 2) and dense[0].tolist() == [[0, 1], [1, 1]] and dense[1].tolist() == [[0, 1], [1, 0]]
    assert bank.epochs[0].hard.tolist() == [2, 1] and bank.epochs[0].valid.tolist() == [2, 2]
    assert bank.epochs[0].missed.tolist() == [1, 1]  # class 0 pixel 1, class 1 pixel 2: present, said absent
    # cells of 2 pixels: pixels 0-1 hard in some class (2 of 2), pixels 2-3: pixel 2 hard, 3 scored for class 0
    assert stats.hardness.tolist() == [[1.0, 0.5]]
    assert stats.ema_kept_fraction == pytest.approx(5 / 7) and stats.ema_hard_loss == pytest.approx(2.0)
    with pytest.raises(ValueError, match=r"a multi-label bank takes hard masks of \(N, C, H, W\)"):
        bank.update(sample_ids=["a"], hard_mask=torch.zeros(1, 1, 4, dtype=torch.bool), pixel_loss=torch.zeros(1, 1, 4),
                    target=torch.zeros(1, 1, 4, dtype=torch.long), pred=torch.zeros(1, 1, 4, dtype=torch.long),
                    source_yx=torch.zeros(1, 2, 1, 4), source_hw=torch.tensor([[1, 4]]), epoch=0)  # fmt: skip


def test_the_store_keeps_a_multilabel_dictionary_and_reports_per_class_errors(tmp_path):
    bank = HardPixelBank(2, cell_size=2, multilabel=True)
    multilabel_update(bank)
    path = tmp_path / "store.sqlite"
    save_bank(bank, path, class_names=["square", "bar"], epoch=1)
    loaded = load_bank(path)
    assert loaded.multilabel and read_meta(path)["multilabel"]
    stats, back = bank.samples["a"], loaded.samples["a"]
    assert back.multilabel and back.confusion_pairs.tolist() == stats.confusion_pairs.tolist()
    assert back.confusion_counts.tolist() == stats.confusion_counts.tolist()
    assert hardest_images(path, class_name="bar")[0]["hard_bar_pixels"] == 1  # positives of bar only
    assert confused_pairs(path) == [
        {"class": "square", "error": "false positive", "hard_pixels": 1, "images": 1},
        {"class": "square", "error": "missed", "hard_pixels": 1, "images": 1},
        {"class": "bar", "error": "false positive", "hard_pixels": 1, "images": 1},
        {"class": "bar", "error": "missed", "hard_pixels": 1, "images": 1},
    ]
    single = HardPixelBank(2)
    save_bank(single, tmp_path / "single.sqlite", class_names=["a", "b"], epoch=0)
    assert not load_bank(tmp_path / "single.sqlite").multilabel


# --- the trainer ---------------------------------------------------------------------------------


def test_training_on_multilabel_masks_end_to_end(tmp_path, capsys):
    write_dataset(tmp_path / "data")
    assert main(["train", *multilabel_args(tmp_path)]) == 0
    run_dir = tmp_path / "ml"
    final = json.loads((run_dir / "epochs.jsonl").read_text().splitlines()[-1])
    assert 0 < final["val/miou"] <= 1 and {"val/iou/square", "val/iou/bar"} <= final.keys()
    bank = load_bank(run_dir / "hard_pixels.sqlite")
    assert bank.multilabel and len(bank.samples) == 8
    positives = sum(stats.hard_positives() for stats in bank.samples.values())
    negatives = sum(int(stats.dense_confusion()[:, 0].sum()) for stats in bank.samples.values())
    # per epoch, top_k 0.5 of each class's positives (row 0 ignored; rounded per image)
    assert positives.tolist() == (bank.epochs[0].hard + bank.epochs[1].hard).tolist()
    for epoch in (0, 1):
        assert np.abs(bank.epochs[epoch].hard - bank.epochs[epoch].valid / 2).max() <= 8
    # negatives: 3 per kept positive, or the 1% minimum (rounded up) per image and class, over 2 epochs
    assert 0 < negatives <= 3 * positives.sum() + (0.01 * 32 * 32 + 1) * 8 * 2 * 2
    assert checkpoint_bank(load_checkpoint(run_dir / "last.pt"), source=run_dir / "last.pt").multilabel
    assert not (run_dir / "viz").exists()  # nothing is drawn per epoch for multi-label classes (yet)
    # the run resumes, evaluates and predicts as multi-label; mine draws one class per pixel
    assert main(["train", "--resume", str(run_dir), "train.epochs=3"]) == 0
    assert json.loads((run_dir / "epochs.jsonl").read_text().splitlines()[-1])["epoch"] == 3
    assert load_bank(run_dir / "hard_pixels.sqlite").epochs.keys() == {0, 1, 2}
    out = tmp_path / "metrics.json"
    assert main(["eval", "--checkpoint", str(run_dir / "best.pt"), "--output", str(out), "train.progress=false"]) == 0
    assert len(json.loads(out.read_text())["iou"]) == 2
    assert main(["predict", "--checkpoint", str(run_dir / "last.pt"), "--input", str(tmp_path / "data" / "val"),
                 "--output", str(tmp_path / "pred"), "train.progress=false"]) == 0  # fmt: skip
    predicted = cv2.imread(str(tmp_path / "pred" / "0.png"), cv2.IMREAD_UNCHANGED)
    assert predicted.shape == (32, 32) and predicted.max() <= 3
    capsys.readouterr()
    assert main(["mine", "--checkpoint", str(run_dir / "last.pt")]) == 2
    assert "trained on multi-label masks" in capsys.readouterr().err
    # the dictionary drives a refinement stage: images by hardness, crops on hard cells, pixel weights
    refine = ["refine.sampler=image", "refine.hard_crop_prob=0.5", "refine.pixel_weight=1"]
    assert main(["refine", "--run", str(run_dir), "--checkpoint", str(run_dir / "last.pt"), "run.name=ml-refine",
                 "train.epochs=5", *refine]) == 0  # fmt: skip
    refined = load_bank(tmp_path / "ml-refine" / "hard_pixels.sqlite")
    assert refined.multilabel and {3, 4} <= refined.epochs.keys()
    # a store of another kind does not drive it
    single = tmp_path / "single.sqlite"
    save_bank(HardPixelBank(2), single, class_names=["square", "bar"], epoch=0)
    capsys.readouterr()
    assert main(["refine", "--run", str(run_dir), "--checkpoint", str(run_dir / "last.pt"), "--bank", str(single),
                 "run.name=ml-refine-2", "train.epochs=5", *refine]) == 2  # fmt: skip
    assert f"refine.bank {single} is a single-label store of 2 classes" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_keep_the_dictionary_of_one(tmp_path):
    """Under torchrun each rank counts its shard; the merged per-class counts equal one process's."""
    write_dataset(tmp_path / "data")
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    cli = ["-m", "segohem.cli", "train", "run.device=cpu"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", *cli]
    args = [arg for arg in multilabel_args(tmp_path) if not arg.startswith(("run.name", "data.batch_size"))]
    for command, name, batch in ((torchrun, "two", 2), ([sys.executable, *cli], "one", 4)):
        done = subprocess.run([*command, *args, f"run.name={name}", f"data.batch_size={batch}"],
                              env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
    one, two = load_bank(tmp_path / "one" / "hard_pixels.sqlite"), load_bank(tmp_path / "two" / "hard_pixels.sqlite")
    assert two.multilabel and len(two.samples) == 8
    for epoch in (0, 1):  # top-k of positives and positives per class do not depend on the model
        assert one.epochs[epoch].hard.tolist() == two.epochs[epoch].hard.tolist()
        assert one.epochs[epoch].valid.tolist() == two.epochs[epoch].valid.tolist()
    assert {k: s.seen for k, s in one.samples.items()} == {k: s.seen for k, s in two.samples.items()}
