"""Dataset kinds on tiny fixtures written in each dataset's own layout and label encoding."""

import pickle

import cv2
import numpy as np
import pytest
from PIL import Image

from segohem.config import ConfigError, load_config
from segohem.data import DatasetError, build_dataset, class_info
from segohem.data.labels import binary_ids, cityscapes_train_ids, colour_ids, reduce_zero_label
from segohem.data.presets import ADE20K, CITYSCAPES, CITYSCAPES_LABELS, VOC

HEIGHT, WIDTH = 4, 6


def write_image(path, value=100):
    """A small image file (its suffix picks the encoding)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cv2.imencode(path.suffix, np.full((HEIGHT, WIDTH, 3), value, np.uint8))[1].tobytes())


def write_labels(path, labels):
    """A single-channel PNG of ``labels`` (8 or 16 bit as the array's dtype)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cv2.imencode(".png", labels)[1].tobytes())


def write_palette_png(path, labels, palette):
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = Image.fromarray(labels.astype(np.uint8), mode="P")
    picture.putpalette([c for rgb in palette for c in rgb] + [224, 224, 192] * (256 - len(palette)))
    picture.save(path)


def labels_of(*values, dtype=np.uint8):
    """A (HEIGHT, WIDTH) map whose first pixels hold ``values`` and the rest the last value."""
    flat = np.full(HEIGHT * WIDTH, values[-1], dtype)
    flat[: len(values)] = values
    return flat.reshape(HEIGHT, WIDTH)


def dataset(root, *overrides, split="train"):
    cfg = load_config(None, [f"data.root={root}", *overrides])
    return build_dataset(cfg.data, cfg.augment, split=split, train=False, seed=0)


def first_mask(ds):
    return ds[0]["mask"][:HEIGHT, :WIDTH].numpy()  # eval pads to a multiple of 32 with the ignore id


# --- Cityscapes --------------------------------------------------------------------------------


def test_cityscapes_label_ids_map_to_the_19_train_ids_value_by_value():
    label_ids = np.array([7, 8, 11, 26, 33, 0, 1, 6, 9, 14, 29, 34, 255, -1], np.int16)
    expected = [0, 1, 2, 13, 18, 255, 255, 255, 255, 255, 255, 255, 255, 255]
    assert cityscapes_train_ids(label_ids).tolist() == expected
    table = {label_id: train_id for _, label_id, train_id, _ in CITYSCAPES_LABELS}
    assert table[-1] == -1 and cityscapes_train_ids(np.array([-1]))[0] == 255  # license plate
    mapped = cityscapes_train_ids(np.arange(34, dtype=np.uint8))
    assert sorted(v for v in mapped.tolist() if v != 255) == list(range(19))  # one label id per train id
    assert CITYSCAPES.class_names[0] == "road" and CITYSCAPES.class_names[13] == "car"
    assert CITYSCAPES.class_names[18] == "bicycle" and len(CITYSCAPES.class_names) == 19
    assert CITYSCAPES.palette[0] == (128, 64, 128) and CITYSCAPES.palette[13] == (0, 0, 142)
    assert CITYSCAPES.ignore_index == 255


def write_cityscapes(root):
    for split, city in (("train", "aachen"), ("val", "lindau"), ("test", "berlin")):
        write_image(root / "leftImg8bit" / split / city / f"{city}_000000_000019_leftImg8bit.png")
    write_labels(root / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png", labels_of(7, 26, 1, 0, 24))
    write_labels(root / "gtFine/val/lindau/lindau_000000_000019_gtFine_labelIds.png", labels_of(7))
    write_labels(root / "gtFine/val/lindau/lindau_000000_000019_gtFine_labelTrainIds.png", labels_of(13, 255, 5))


def test_cityscapes_reads_label_ids_or_train_ids_and_the_test_split(tmp_path):
    write_cityscapes(tmp_path)
    train = dataset(tmp_path, "data.kind=cityscapes")
    assert len(train) == 1 and train.sample_id(0) == "aachen_000000_000019"
    assert first_mask(train).ravel()[:6].tolist() == [0, 13, 255, 255, 11, 11]
    val = dataset(tmp_path, "data.kind=cityscapes", split="val")  # labelTrainIds present: used as stored
    assert first_mask(val).ravel()[:4].tolist() == [13, 255, 5, 5]
    test = dataset(tmp_path, "data.kind=cityscapes", split="test")  # no gtFine/test: every pixel ignored
    assert (first_mask(test) == 255).all() and test.sample_id(0) == "berlin_000000_000019"
    write_labels(tmp_path / "gtFine/test/berlin/berlin_000000_000019_gtFine_labelIds.png", labels_of(0))
    assert (first_mask(dataset(tmp_path, "data.kind=cityscapes", split="test")) == 255).all()  # the public gtFine/test
    info = class_info(load_config(None, ["data.kind=cityscapes", "data.root=x"]).data)
    assert info.names == CITYSCAPES.class_names and info.ignore_index == 255


def test_cityscapes_wrong_layout_names_the_folder_and_the_key(tmp_path):
    write_cityscapes(tmp_path / "cityscapes")
    message = r"expects the train images .* in .*/leftImg8bit/train, which does not exist; set data\.root"
    with pytest.raises(DatasetError, match=message):
        dataset(tmp_path, "data.kind=cityscapes")
    (tmp_path / "cityscapes/gtFine/val/lindau/lindau_000000_000019_gtFine_labelTrainIds.png").unlink()
    (tmp_path / "cityscapes/gtFine/val/lindau/lindau_000000_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(
        DatasetError, match=r"1 of 1 val images have no gtFine label file, e\.g\. \['gtFine/val/lindau/"
    ):
        dataset(tmp_path / "cityscapes", "data.kind=cityscapes", split="val")


# --- ADE20K ------------------------------------------------------------------------------------


def test_ade20k_reduces_zero_label_value_by_value():
    reduced = reduce_zero_label(np.array([0, 1, 2, 150], np.uint8), num_classes=150, where="a.png")
    assert reduced.tolist() == [255, 0, 1, 149]
    with pytest.raises(DatasetError, match=r"a\.png: label values \[151, 200\] are not ADE20K annotation values"):
        reduce_zero_label(np.array([0, 151, 200], np.uint8), num_classes=150, where="a.png")
    assert len(ADE20K.class_names) == len(ADE20K.palette) == 150 and ADE20K.ignore_index == 255
    assert ADE20K.class_names[:3] == ("wall", "building", "sky") and ADE20K.class_names[-1] == "flag"
    assert ADE20K.class_names[7] == "bed"  # mmseg spells it 'bed ' with a trailing space
    assert ADE20K.palette[0] == (120, 120, 120) and ADE20K.palette[-1] == (92, 0, 255)


def write_ade20k(root):
    base = root / "ADEChallengeData2016"
    for folder, stem, labels in (("training", "ADE_train_00000001", labels_of(0, 1, 150, 13)),
                                 ("validation", "ADE_val_00000001", labels_of(2))):  # fmt: skip
        write_image(base / "images" / folder / f"{stem}.jpg")
        write_labels(base / "annotations" / folder / f"{stem}.png", labels)


def test_ade20k_reads_its_layout_from_the_root_or_its_parent(tmp_path):
    write_ade20k(tmp_path)
    for root in (tmp_path, tmp_path / "ADEChallengeData2016"):
        train = dataset(root, "data.kind=ade20k")
        assert train.sample_id(0) == "ADE_train_00000001"
        assert first_mask(train).ravel()[:4].tolist() == [255, 0, 149, 12]
        assert (first_mask(dataset(root, "data.kind=ade20k", split="val")) == 1).all()
    info = class_info(load_config(None, ["data.kind=ade20k", "data.root=x"]).data)
    assert info.names == ADE20K.class_names and info.num_classes == 150 and info.ignore_index == 255
    with pytest.raises(DatasetError, match=r"data\.kind=ade20k has the splits train, val"):
        dataset(tmp_path, "data.kind=ade20k", split="test")


def test_ade20k_wrong_layout_names_the_folder_and_the_key(tmp_path):
    write_image(tmp_path / "ADEChallengeData2016/images/training/a.jpg")
    message = r"expects the train annotations \(\*\.png\) in .*ADEChallengeData2016/annotations/training, .*data\.root"
    with pytest.raises(DatasetError, match=message):
        dataset(tmp_path, "data.kind=ade20k")


# --- PASCAL VOC --------------------------------------------------------------------------------


def voc_colour_map(num_classes):
    """The VOC devkit's colour map: the bits of the class id spread over R, G and B, high bits first."""
    colours = []
    for class_id in range(num_classes):
        rgb, value = [0, 0, 0], class_id
        for shift in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((value >> channel) & 1) << shift
            value >>= 3
        colours.append(tuple(rgb))
    return colours


def write_voc(root, *, aug):
    base = root / "VOCdevkit" / "VOC2012"
    for stem in ("2007_000032", "2007_000033", "2008_000001"):
        write_image(base / "JPEGImages" / f"{stem}.jpg")
    write_palette_png(base / "SegmentationClass/2007_000032.png", labels_of(0, 15, 255, 1), VOC.palette)
    write_palette_png(base / "SegmentationClass/2007_000033.png", labels_of(20, 0), VOC.palette)
    sets = base / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("2007_000032\n")
    (sets / "val.txt").write_text("2007_000033\n")
    if aug:  # mmsegmentation's voc_aug.py: SBD's masks as grey PNGs, trainaug.txt = train + SBD - val
        write_labels(base / "SegmentationClassAug/2007_000032.png", labels_of(3))  # VOC's own mask wins
        write_labels(base / "SegmentationClassAug/2008_000001.png", labels_of(7, 0))
        (sets / "trainaug.txt").write_text("2007_000032\n2008_000001\n")
    return base


def test_voc_palette_is_the_devkit_colour_map_and_255_stays_ignored(tmp_path):
    assert VOC.palette == tuple(voc_colour_map(21)) and len(VOC.class_names) == 21
    assert VOC.class_names[0] == "background" and VOC.class_names[15] == "person" and VOC.ignore_index == 255
    base = write_voc(tmp_path, aug=False)
    for root in (tmp_path, tmp_path / "VOCdevkit", base):
        train = dataset(root, "data.kind=voc")
        assert len(train) == 1 and train.sample_id(0) == "2007_000032"
        assert first_mask(train).ravel()[:4].tolist() == [0, 15, 255, 1]  # palette indices, boundary ignored
        assert first_mask(dataset(root, "data.kind=voc", split="val")).ravel()[:2].tolist() == [20, 0]
    assert class_info(load_config(None, ["data.kind=voc", "data.root=x"]).data).names == VOC.class_names
    with pytest.raises(DatasetError, match=r"expects the test split's stems in .*test\.txt.*--split val"):
        dataset(tmp_path, "data.kind=voc", split="test")


def test_voc_trainaug_is_chosen_when_sbd_is_there(tmp_path):
    with pytest.raises(DatasetError, match=r"data\.voc_train_set=trainaug needs .*trainaug\.txt and .*ClassAug"):
        dataset(write_voc(tmp_path / "plain", aug=False), "data.kind=voc", "data.voc_train_set=trainaug")
    write_voc(tmp_path, aug=True)
    auto = dataset(tmp_path, "data.kind=voc")
    assert [auto.sample_id(i) for i in range(len(auto))] == ["2007_000032", "2008_000001"]
    assert auto.read(0)[1].ravel()[:2].tolist() == [0, 15]  # SegmentationClass, not SegmentationClassAug
    assert auto.read(1)[1].ravel()[:2].tolist() == [7, 0]
    assert len(dataset(tmp_path, "data.kind=voc", "data.voc_train_set=train")) == 1
    assert len(dataset(tmp_path, "data.kind=voc", "data.voc_train_set=trainaug")) == 2


def test_voc_wrong_layout_names_the_folder_and_the_key(tmp_path):
    (tmp_path / "VOCdevkit").mkdir()
    with pytest.raises(DatasetError, match=r"expects the images \(\*\.jpg\) in .*JPEGImages, .*; set data\.root"):
        dataset(tmp_path, "data.kind=voc")


# --- folder: colour, binary and 16-bit masks, split lists ------------------------------------


def write_folder(root, labels, *, image_suffix=".jpg"):
    write_image(root / "train" / f"a{image_suffix}")
    if labels.ndim == 3:
        write_image_array(root / "trainannot" / "a.png", labels)
    else:
        write_labels(root / "trainannot" / "a.png", labels)


def write_image_array(path, rgb):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))[1].tobytes())


PALETTE = "data.palette=[[0, 0, 0], [255, 0, 0], [0, 0, 255]]"


def test_colour_ids_value_by_value():
    rgb = np.array([[[0, 0, 0], [255, 0, 0], [0, 0, 255], [9, 9, 9]]], np.uint8)
    ids = colour_ids(rgb, palette=[(0, 0, 0), (255, 0, 0), (0, 0, 255)], ignore_colours=[(9, 9, 9)],
                     ignore_index=255, where="m.png")  # fmt: skip
    assert ids.tolist() == [[0, 1, 2, 255]]


def test_rgb_masks_map_colours_through_the_palette(tmp_path):
    rgb = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    rgb[0, 1], rgb[0, 2], rgb[1] = (255, 0, 0), (0, 0, 255), (255, 255, 255)
    write_folder(tmp_path, rgb)
    overrides = ["data.kind=folder", "data.class_names=[bg, red, blue]", PALETTE, "data.mask_format=rgb"]
    ds = dataset(tmp_path, *overrides, "data.ignore_colors=[[255, 255, 255]]")
    mask = first_mask(ds)
    assert mask[0, :3].tolist() == [0, 1, 2] and (mask[1] == 255).all() and (mask[2:] == 0).all()
    assert pickle.loads(pickle.dumps(ds)).read(0)[1].tolist() == ds.read(0)[1].tolist()  # DataLoader workers
    message = r"trainannot/a\.png: 1 colour\(s\) are neither in data\.palette .*: \(255, 255, 255\) in 6 pixels"
    with pytest.raises(DatasetError, match=message):
        dataset(tmp_path, *overrides)[0]
    with pytest.raises(ConfigError, match=r"data\.palette is required for data\.mask_format=rgb"):
        dataset(tmp_path, "data.kind=folder", "data.class_names=[a, b, c]", "data.mask_format=rgb")
    with pytest.raises(ConfigError, match=r"\[\[0, 0, 0\]\] appear more than once"):
        dataset(tmp_path, *overrides, "data.ignore_colors=[[0, 0, 0]]")


@pytest.mark.parametrize(
    ("values", "expected"), [((0, 255), [0, 1]), ((0, 1), [0, 1]), ((255, 255), [1, 1]), ((0, 0), [0, 0])]
)
def test_binary_masks_give_two_classes(tmp_path, values, expected):
    assert binary_ids(np.array(values, np.uint8), where="m.png").tolist() == expected
    write_folder(tmp_path, labels_of(*values))
    ds = dataset(tmp_path, "data.kind=folder", "data.mask_format=binary")
    assert first_mask(ds).ravel()[:2].tolist() == expected and ds.num_classes == 2
    assert class_info(load_config(None, ["data.kind=folder", "data.root=x", "data.mask_format=binary"]).data).names == (
        "background", "foreground",
    )  # fmt: skip


@pytest.mark.parametrize("values", [(0, 1, 255), (0, 128), (2, 0)])
def test_other_binary_values_are_an_error_naming_the_file(tmp_path, values):
    write_folder(tmp_path, labels_of(*values))
    with pytest.raises(DatasetError, match=rf"trainannot/a\.png: a binary mask holds 0/255 or 0/1, .*{sorted(values)}"):
        dataset(tmp_path, "data.kind=folder", "data.mask_format=binary")[0]


def test_16_bit_masks_keep_ids_above_255(tmp_path):
    write_folder(tmp_path, labels_of(0, 299, 65535, 3, dtype=np.uint16), image_suffix=".png")
    names = ",".join(f"c{i}" for i in range(300))
    ds = dataset(tmp_path, "data.kind=folder", f"data.class_names=[{names}]", "data.ignore_index=65535")
    assert first_mask(ds).ravel()[:4].tolist() == [0, 299, 65535, 3]
    assert (ds[0]["mask"][HEIGHT:] == 65535).all()  # padding with a 16-bit ignore id


def test_split_lists_name_samples_by_stem_or_relative_path(tmp_path):
    for stem, value in (("a", 0), ("b", 1), ("seq/c", 2)):
        write_image(tmp_path / "images" / f"{stem}.jpg")
        write_labels(tmp_path / "labels" / f"{stem}.png", labels_of(value))
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists/train.txt").write_text("a\n\nseq/c.jpg\n")
    (tmp_path / "lists/val.txt").write_text("b\n")
    folders = [f"data.{split}_{what}={name}" for split in ("train", "val")
               for what, name in (("images", "images"), ("masks", "labels"))]  # fmt: skip
    common = ["data.kind=folder", "data.class_names=[a, b, c]", *folders]
    lists = ["data.train_list=lists/train.txt", "data.val_list=lists/val.txt"]
    train = dataset(tmp_path, *common, *lists)
    assert [train.sample_id(i) for i in range(len(train))] == ["a", "seq/c"]
    assert [int(train.read(i)[1][0, 0]) for i in range(2)] == [0, 2]
    val = dataset(tmp_path, *common, *lists, split="val")
    assert len(val) == 1 and val.sample_id(0) == "b"
    (tmp_path / "lists/train.txt").write_text("a\nmissing\n")
    message = r"1 of the 2 entries of data\.train_list .*lists/train\.txt have no image .*\['missing'\]"
    with pytest.raises(DatasetError, match=message):
        dataset(tmp_path, *common, *lists)
    (tmp_path / "lists/train.txt").write_text("a\nb\na.jpg\na\n")
    with pytest.raises(
        DatasetError, match=r"train\.txt \(data\.train_list\) line 3 names sample 'a' again \(first on line 1\)"
    ):
        dataset(tmp_path, *common, *lists)
    with pytest.raises(DatasetError, match=r"cannot read the split list .*nope\.txt \(data\.train_list\)"):
        dataset(tmp_path, *common, "data.train_list=nope.txt")


def test_folder_options_are_refused_for_kinds_with_their_own_layout():
    with pytest.raises(ConfigError, match=r"data\.train_list, data\.mask_format describe folder / camvid data"):
        load_config(None, ["data.kind=cityscapes", "data.root=x", "data.train_list=a.txt", "data.mask_format=rgb"])
    for kind in ("cityscapes", "ade20k", "voc"):
        with pytest.raises(ConfigError, match=rf"data\.root is required for data\.kind={kind}"):
            load_config(None, [f"data.kind={kind}"])
    # the encoding fixes a named kind's ignore id: another one is refused, not silently replaced
    with pytest.raises(ConfigError, match=r"data\.ignore_index=0: data\.kind=camvid ignores label 11"):
        class_info(load_config(None, ["data.kind=camvid", "data.root=x", "data.ignore_index=0"]).data)
    assert class_info(load_config(None, ["data.kind=camvid", "data.root=x"]).data).ignore_index == 11
    assert (
        class_info(load_config(None, ["data.kind=voc", "data.root=x", "data.ignore_index=255"]).data).ignore_index
        == 255
    )
    # and so are its classes: names rename them one for one
    with pytest.raises(ConfigError, match=r"data\.class_names lists 2 names, but data\.kind=synthetic has 7 classes"):
        class_info(load_config(None, ["data.class_names=[a, b]"]).data)
