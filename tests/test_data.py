import cv2
import numpy as np
import pytest

from segohem.config import AugmentConfig, load_config
from segohem.data import DatasetError, FolderDataset, SyntheticDataset, build_dataset
from segohem.data.presets import CAMVID, SYNTHETIC
from segohem.data.samplers import EpochShuffleSampler
from segohem.data.transforms import build_eval_transform, build_train_transform


def write_pair(folder, stem, image, mask):
    (folder / "img").mkdir(exist_ok=True)
    (folder / "ann").mkdir(exist_ok=True)
    cv2.imwrite(str(folder / "img" / f"{stem}.png"), image)
    cv2.imwrite(str(folder / "ann" / f"{stem}.png"), mask)


def folder_dataset(tmp_path, **kwargs):
    return FolderDataset(tmp_path / "img", tmp_path / "ann", num_classes=3, ignore_index=255, **kwargs)


def test_synthetic_is_deterministic_and_imbalanced():
    ds = SyntheticDataset(split="train", length=40, image_size=(96, 128), num_classes=7, ignore_index=255)
    image_a, mask_a = ds.read(3)
    image_b, mask_b = ds.read(3)
    assert np.array_equal(image_a, image_b) and np.array_equal(mask_a, mask_b)
    assert not np.array_equal(ds.read(4)[1], mask_a)
    counts = np.zeros(256, np.int64)
    for i in range(40):
        counts += np.bincount(ds.read(i)[1].ravel(), minlength=256)
    share = counts[:7] / counts[:7].sum()
    assert share[[0, 2]].min() > 0.3 and share[1] > 0.05  # large easy regions
    assert share[[4, 5, 6]].max() < 0.03 and share[[4, 5, 6]].min() > 0  # thin, small, rare
    assert counts[SYNTHETIC.ignore_index] > 0
    assert ds.sample_id(3) == "synthetic-train-00003"


def test_folder_dataset_reads_and_matches_by_stem(tmp_path):
    for stem in ("b", "a"):
        write_pair(tmp_path, stem, np.full((20, 30, 3), 100, np.uint8), np.ones((20, 30), np.uint8))
    ds = folder_dataset(tmp_path)
    assert [ds.sample_id(i) for i in range(len(ds))] == ["a", "b"]
    sample = ds[0]
    assert sample["image"].shape == (3, 20, 30) and sample["mask"].shape == (20, 30)
    assert sample["sample_id"] == "a"


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("corrupt", r"cannot read image .*a\.png"),
        ("size", r"label file .*ann/a\.png is 31x20 but its image .*img/a\.png is 30x20"),
        ("label", r"ann/a\.png: label values \[7\] are outside the classes 0\.\.2"),
        ("channels", r"ann/a\.png has 3 channels"),
    ],
)
def test_bad_samples_raise_errors_naming_the_file(tmp_path, case, message):
    image, mask = np.zeros((20, 30, 3), np.uint8), np.zeros((20, 30), np.uint8)
    if case == "size":
        mask = np.zeros((20, 31), np.uint8)
    if case == "label":
        mask[5, 5], mask[0, 0] = 7, 255
    if case == "channels":
        mask = np.zeros((20, 30, 3), np.uint8)
    write_pair(tmp_path, "a", image, mask)
    if case == "corrupt":
        (tmp_path / "img" / "a.png").write_bytes(b"not a png at all")
    with pytest.raises(DatasetError, match=message):
        folder_dataset(tmp_path)[0]


def test_missing_label_file_is_named(tmp_path):
    write_pair(tmp_path, "a", np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint8))
    cv2.imwrite(str(tmp_path / "img" / "lonely.png"), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(DatasetError, match=r"no label file .*\['lonely'\]"):
        folder_dataset(tmp_path)


def test_crop_and_pad_fill_masks_with_ignore_never_class_zero():
    cfg = AugmentConfig(crop=[64, 64], hflip=0.0)
    image, mask = np.zeros((40, 50, 3), np.uint8), np.ones((40, 50), np.uint8)
    out = build_train_transform(cfg, ignore_index=255)(image=image, mask=mask)
    assert out["mask"].shape == (64, 64)
    assert set(np.unique(out["mask"])) == {1, 255}
    out = build_eval_transform(cfg, ignore_index=255)(image=image, mask=mask)
    assert out["mask"].shape == (64, 64)  # padded to a multiple of 32, bottom/right only
    assert (out["mask"][:40, :50] == 1).all() and (out["mask"][40:] == 255).all()


def test_augmentation_is_seeded_by_seed_epoch_and_index():
    cfg = load_config(None, ["augment.scale=[0.5, 1.5]", "augment.crop=[64, 64]", "data.image_size=[96, 128]"])
    ds = build_dataset(cfg.data, cfg.augment, split="train", train=True, seed=0)
    first = ds[1]["mask"]
    assert (ds[1]["mask"] == first).all()
    ds.set_epoch(1)
    assert not (ds[1]["mask"] == first).all()


def test_sampler_is_a_seeded_permutation_per_epoch_and_splits_ranks():
    sampler = EpochShuffleSampler(10, seed=3)
    epoch0 = list(sampler)
    assert sorted(epoch0) == list(range(10)) and list(sampler) == epoch0
    sampler.set_epoch(1)
    assert list(sampler) != epoch0
    ranks = [list(EpochShuffleSampler(10, seed=3, rank=r, world_size=3)) for r in range(3)]
    assert all(len(r) == 4 for r in ranks) and {i for r in ranks for i in r} == set(range(10))


def test_camvid_preset_reads_the_real_split(camvid_root):
    cfg = load_config(None, ["data.kind=camvid", f"data.root={camvid_root}"])
    ds = build_dataset(cfg.data, cfg.augment, split="val", train=False, seed=0)
    assert len(ds) == 101
    sample = ds[0]
    assert sample["image"].shape == (3, 384, 480)  # 360 padded to a multiple of 32
    labels = set(sample["mask"].unique().tolist())
    assert labels <= set(range(11)) | {CAMVID.ignore_index}
    assert (sample["mask"][360:] == CAMVID.ignore_index).all()
