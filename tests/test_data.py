import os

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from segohem.config import AugmentConfig, ConfigError, load_config
from segohem.data import (
    SPLITS,
    DatasetError,
    FolderDataset,
    SyntheticDataset,
    build_dataset,
    collate_samples,
    dataset_error_message,
    read_image,
    read_mask,
)  # fmt: skip
from segohem.data.presets import CAMVID, SYNTHETIC
from segohem.data.samplers import EpochShuffleSampler, ShardSampler
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
        ("size", r"label file .*ann/a\.png is 20x31 but its image .*img/a\.png is 20x30 \(height x width\)"),
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


def write_bytes_named(folder, name: bytes, data: bytes):
    """Write ``data`` under a raw byte file name (which need not be valid UTF-8)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(os.fsencode(folder), name), "wb") as file:
        file.write(data)


def png_bytes(array):
    return cv2.imencode(".png", array)[1].tobytes()


def test_reader_and_dataset_accept_file_names_that_are_not_utf8(tmp_path):
    image = np.zeros((6, 8, 3), np.uint8)
    image[..., 0] = 200  # red in RGB order
    mask = np.arange(48, dtype=np.uint8).reshape(6, 8) % 3
    write_bytes_named(tmp_path / "img", b"a\xff.png", png_bytes(image[..., ::-1]))
    write_bytes_named(tmp_path / "ann", b"a\xff.png", png_bytes(mask))
    image_path = tmp_path / "img" / os.fsdecode(b"a\xff.png")
    assert np.array_equal(read_image(image_path), image)
    assert np.array_equal(read_mask(tmp_path / "ann" / os.fsdecode(b"a\xff.png")), mask)
    ds = folder_dataset(tmp_path)
    sample = next(iter(DataLoader(ds, batch_size=1, collate_fn=collate_samples)))
    assert sample["sample_id"] == ["a\\xff"]  # printable, and storable as UTF-8 text
    assert torch.equal(sample["mask"][0], torch.from_numpy(mask.astype(np.int64)))


def test_a_broken_file_with_a_non_utf8_name_is_named_printably(tmp_path):
    write_bytes_named(tmp_path, b"b\xff.png", b"")
    with pytest.raises(DatasetError, match=r"b\\xff\.png: the file is empty") as err:
        read_image(tmp_path / os.fsdecode(b"b\xff.png"))
    str(err.value).encode("utf-8")  # printable on a UTF-8 terminal


@pytest.mark.parametrize("reader", [read_image, read_mask])
@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty", r"x\.png: the file is empty \(0 bytes\)"),
        ("corrupt", r"x\.png: corrupt or not an image"),
        ("missing", r"x\.png: No such file or directory"),
        ("folder", r"x\.png: Is a directory"),
    ],
)
def test_unreadable_files_raise_dataset_error_naming_the_file(tmp_path, reader, case, message):
    path = tmp_path / "x.png"
    if case == "empty":
        path.write_bytes(b"")
    if case == "corrupt":
        path.write_bytes(png_bytes(np.zeros((8, 8), np.uint8))[:40])  # truncated PNG
    if case == "folder":
        path.mkdir()
    with pytest.raises(DatasetError, match=message):
        reader(path)


def test_palette_png_masks_give_their_indices_not_colours(tmp_path):
    write_pair(tmp_path, "a", np.zeros((6, 8, 3), np.uint8), np.zeros((6, 8), np.uint8))
    labels = np.zeros((6, 8), np.uint8)
    labels[2:, :4], labels[0, 0] = 1, 255
    palette_mask = Image.fromarray(labels, mode="P")
    palette_mask.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [224, 224, 192] * 253)  # VOC-like
    palette_mask.save(tmp_path / "ann" / "a.png")
    assert Image.open(tmp_path / "ann" / "a.png").mode == "P"  # really a colour type 3 PNG
    assert np.array_equal(read_mask(tmp_path / "ann" / "a.png"), labels)
    assert np.array_equal(folder_dataset(tmp_path)[0]["mask"].numpy(), labels)


@pytest.mark.parametrize("folder", ["img", "ann"])
def test_two_files_with_one_stem_are_an_error_naming_both(tmp_path, folder):
    write_pair(tmp_path, "a", np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint8))
    cv2.imwrite(str(tmp_path / folder / "a.jpg"), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(DatasetError, match=rf"{folder} .*\(a\.jpg and a\.png\); .*keep one file per stem"):
        folder_dataset(tmp_path)


def test_collate_names_samples_of_different_sizes_and_the_fix():
    def sample(sample_id, height, width):
        return {
            "image": torch.zeros(3, height, width), "mask": torch.zeros(height, width, dtype=torch.int64),
            "source_hw": torch.tensor([height, width]), "sample_id": sample_id, "index": 0,
        }  # fmt: skip

    batch = collate_samples([sample("a", 4, 6), sample("b", 4, 6)])
    assert batch["image"].shape == (2, 3, 4, 6) and batch["sample_id"] == ["a", "b"]
    with pytest.raises(DatasetError, match=r"image size .*: a 4x6, b 5x6; set data\.resize=\[H, W\] .*augment\.crop"):
        collate_samples([sample("a", 4, 6), sample("b", 5, 6)])


def test_a_loader_over_images_of_two_sizes_names_them(tmp_path):
    write_pair(tmp_path, "small", np.zeros((20, 30, 3), np.uint8), np.zeros((20, 30), np.uint8))
    write_pair(tmp_path, "tall", np.zeros((40, 30, 3), np.uint8), np.zeros((40, 30), np.uint8))
    loader = DataLoader(folder_dataset(tmp_path), batch_size=2, collate_fn=collate_samples)
    with pytest.raises(DatasetError, match=r"small 20x30, tall 40x30; set data\.resize"):
        next(iter(loader))
    resized = folder_dataset(tmp_path, resize=(24, 32))
    assert next(iter(DataLoader(resized, batch_size=2, collate_fn=collate_samples)))["image"].shape == (2, 3, 24, 32)


def test_a_worker_error_gives_back_its_one_line_message(tmp_path):
    write_pair(tmp_path, "a", np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint8))
    (tmp_path / "img" / "a.png").write_bytes(b"not a png at all")
    ds = folder_dataset(tmp_path)
    with pytest.raises(DatasetError) as direct:
        ds[0]
    with pytest.raises(DatasetError) as from_worker:
        next(iter(DataLoader(ds, batch_size=1, num_workers=1)))
    assert "Traceback" in str(from_worker.value)  # what torch makes of it
    assert dataset_error_message(from_worker.value) == str(direct.value)
    assert dataset_error_message(direct.value) == str(direct.value)
    assert "img/a.png: corrupt or not an image" in str(direct.value)


def test_the_test_split_reads_its_own_folders(tmp_path):
    for split, value in (("train", 0), ("val", 1), ("test", 2)):
        for folder in (split, f"{split}annot"):
            (tmp_path / folder).mkdir()
        cv2.imwrite(str(tmp_path / split / f"{split}.png"), np.zeros((4, 4, 3), np.uint8))
        cv2.imwrite(str(tmp_path / f"{split}annot" / f"{split}.png"), np.full((4, 4), value, np.uint8))
    cfg = load_config(None, ["data.kind=folder", f"data.root={tmp_path}", "data.class_names=[a, b, c]"])
    assert SPLITS == ("train", "val", "test")
    for value, split in enumerate(SPLITS):
        ds = build_dataset(cfg.data, cfg.augment, split=split, train=False, seed=0)
        assert ds.sample_id(0) == split and (ds.read(0)[1] == value).all()


def test_unknown_or_absent_splits_say_what_to_set(tmp_path):
    cfg = load_config(None, ["data.kind=folder", f"data.root={tmp_path}", "data.class_names=[a, b]"])
    with pytest.raises(ConfigError, match=r"split 'tst' is unknown; valid splits: train, val, test"):
        build_dataset(cfg.data, cfg.augment, split="tst", train=False, seed=0)
    (tmp_path / "test").mkdir()
    message = r"test split's label folder .*testannot does not exist; set data\.test_images and data\.test_masks"
    with pytest.raises(DatasetError, match=message):
        build_dataset(cfg.data, cfg.augment, split="test", train=False, seed=0)


def test_synthetic_test_split_has_its_own_scenes():
    cfg = load_config(None, ["data.num_val=3", "data.image_size=[32, 32]"])
    val, test = (build_dataset(cfg.data, cfg.augment, split=s, train=False, seed=0) for s in ("val", "test"))
    assert len(test) == len(val) == 3 and test.sample_id(0) == "synthetic-test-00000"
    assert np.array_equal(test.read(0)[0], test.read(0)[0])
    assert not any(np.array_equal(test.read(i)[0], val.read(i)[0]) for i in range(3))


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


def merge_shards(shards, batch_size):
    """The global order N ranks saw together: block r of every global batch comes from rank r."""
    batches = len(shards[0]) // batch_size
    return [i for b in range(batches) for shard in shards for i in shard[b * batch_size : (b + 1) * batch_size]]


def test_sampler_is_a_seeded_permutation_per_epoch():
    sampler = EpochShuffleSampler(10, seed=3, batch_size=1)
    epoch0 = list(sampler)
    assert sorted(epoch0) == list(range(10)) and list(sampler) == epoch0
    sampler.set_epoch(1)
    assert list(sampler) != epoch0


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_disjoint_blocks_of_the_one_process_batches(world_size):
    single = EpochShuffleSampler(13, seed=3, batch_size=2 * world_size)
    shards = [list(EpochShuffleSampler(13, seed=3, batch_size=2, rank=r, world_size=world_size))
              for r in range(world_size)]  # fmt: skip
    assert all(len(shard) == len(shards[0]) for shard in shards)  # equal batch counts: no DDP hang
    assert len({i for shard in shards for i in shard}) == sum(map(len, shards))  # disjoint
    assert merge_shards(shards, 2) == list(single)  # the same batches as one process x world_size*2
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        EpochShuffleSampler(3, seed=0, batch_size=2, rank=0, world_size=2)


def test_shard_sampler_counts_every_sample_once():
    shards = [list(ShardSampler(7, rank=r, world_size=3)) for r in range(3)]
    assert sorted(i for shard in shards for i in shard) == list(range(7))


def test_camvid_preset_reads_the_real_split(camvid_root):
    cfg = load_config(None, ["data.kind=camvid", f"data.root={camvid_root}"])
    ds = build_dataset(cfg.data, cfg.augment, split="val", train=False, seed=0)
    assert len(ds) == 101
    sample = ds[0]
    assert sample["image"].shape == (3, 384, 480)  # 360 padded to a multiple of 32
    labels = set(sample["mask"].unique().tolist())
    assert labels <= set(range(11)) | {CAMVID.ignore_index}
    assert (sample["mask"][360:] == CAMVID.ignore_index).all()


def test_camvid_without_a_test_folder_names_the_keys(camvid_root):
    cfg = load_config(None, ["data.kind=camvid", f"data.root={camvid_root}"])
    if (camvid_root / "test").is_dir():
        pytest.skip(f"{camvid_root} has a test split")
    with pytest.raises(DatasetError, match=r"camvid/test does not exist; set data\.test_images and data\.test_masks"):
        build_dataset(cfg.data, cfg.augment, split="test", train=False, seed=0)
