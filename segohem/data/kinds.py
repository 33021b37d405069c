"""Where each `data.kind` keeps its files and how its labels are encoded: (sample pairs, label reader) per split."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from segohem.config import ConfigError, DataConfig
from segohem.data.datasets import LabelReader
from segohem.data.errors import DatasetError
from segohem.data.io import display_path, read_mask
from segohem.data.labels import (
    CITYSCAPES_TRAIN_IDS_SUFFIX,
    ColourLabels,
    read_ade20k_labels,
    read_binary_labels,
    read_cityscapes_labels,
)
from segohem.data.pairing import SamplePair, folder_pairs, listed_pairs, read_split_list
from segohem.data.presets import ClassInfo

CITYSCAPES_IMAGE_SUFFIX = "_leftImg8bit.png"
CITYSCAPES_LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"
ADE20K_FOLDERS = {"train": "training", "val": "validation"}


class Layout(Protocol):
    def __call__(self, data: DataConfig, *, split: str, info: ClassInfo) -> tuple[list[SamplePair], LabelReader]: ...


def _expect_folder(folder: Path, *, kind: str, holds: str, fix: str) -> None:
    """DatasetError naming the folder ``kind`` expects and the key that would fix it, if it is absent."""
    if not folder.is_dir():
        raise DatasetError(f"data.kind={kind} expects {holds} in {display_path(folder)}, which does not exist; {fix}")


def split_folders(data: DataConfig, *, split: str) -> tuple[Path, Path]:
    """The (image folder, label folder) of ``split`` under ``data.root``; DatasetError naming the keys if absent."""
    names = {
        "train": (data.train_images, data.train_masks),
        "val": (data.val_images, data.val_masks),
        "test": (data.test_images, data.test_masks),
    }[split]
    root = Path(data.root)
    for what, name in zip(("image", "label"), names, strict=True):
        if not (root / name).is_dir():
            raise DatasetError(
                f"the {split} split's {what} folder {display_path(root / name)} does not exist; set "
                f"data.{split}_images and data.{split}_masks to its image and label folders "
                f"(relative to data.root={display_path(root)})"
            )
    return root / names[0], root / names[1]


def folder_reader(data: DataConfig, info: ClassInfo) -> LabelReader:
    """The label reader of ``data.mask_format``: stored ids, colours through the palette, or 0/255 | 0/1."""
    if data.mask_format == "rgb":
        ignore_colours = tuple((r, g, b) for r, g, b in data.ignore_colors)
        colours = [*info.palette, *ignore_colours]
        repeated = sorted({rgb for rgb in colours if colours.count(rgb) > 1})
        if repeated:
            raise ConfigError(
                f"data.mask_format=rgb reads a colour as one class, but {[list(c) for c in repeated]} appear more "
                f"than once in data.palette and data.ignore_colors; give each class its own colour"
            )
        return ColourLabels(info.palette, ignore_colours, info.ignore_index)
    return read_binary_labels if data.mask_format == "binary" else read_mask


def folder_layout(data: DataConfig, *, split: str, info: ClassInfo) -> tuple[list[SamplePair], LabelReader]:
    """folder / camvid: the split's image and label folders, all their files or those its list names."""
    image_dir, mask_dir = split_folders(data, split=split)
    list_name = getattr(data, f"{split}_list")
    if not list_name:
        return folder_pairs(image_dir, mask_dir), folder_reader(data, info)
    key, list_path = f"data.{split}_list", Path(data.root) / list_name
    entries = read_split_list(
        list_path, key=key, fix=f"set {key} to a text file under data.root with one stem or relative path a line"
    )
    pairs = listed_pairs(
        entries, image_dir=image_dir, mask_dirs=[mask_dir], list_name=f"{key} {display_path(list_path)}"
    )
    return pairs, folder_reader(data, info)


def cityscapes_layout(data: DataConfig, *, split: str, info: ClassInfo) -> tuple[list[SamplePair], LabelReader]:
    """leftImg8bit/<split>/<city>/*_leftImg8bit.png with gtFine/<split>/<city>/*_gtFine_labelTrainIds.png
    where present, else *_gtFine_labelIds.png (mapped to train ids). The test split's labels are
    withheld (the public gtFine/test is all "unlabeled"): without gtFine/test every pixel is ignored."""
    root = Path(data.root)
    fix = f"set data.root to the Cityscapes folder holding leftImg8bit/ and gtFine/ (data.root={display_path(root)})"
    image_root, label_root = root / "leftImg8bit" / split, root / "gtFine" / split
    _expect_folder(
        image_root, kind="cityscapes", holds=f"the {split} images (<city>/*{CITYSCAPES_IMAGE_SUFFIX})", fix=fix
    )
    images = sorted(image_root.glob(f"*/*{CITYSCAPES_IMAGE_SUFFIX}"))
    if not images:
        raise DatasetError(f"no <city>/*{CITYSCAPES_IMAGE_SUFFIX} images in {display_path(image_root)}; {fix}")
    labelled = split != "test" or label_root.is_dir()
    if labelled:
        _expect_folder(
            label_root, kind="cityscapes", holds=f"the {split} labels (<city>/*{CITYSCAPES_LABEL_IDS_SUFFIX})", fix=fix
        )
    pairs, missing = [], []
    for image_path in images:
        stem = image_path.name[: -len(CITYSCAPES_IMAGE_SUFFIX)]
        candidates = [label_root / image_path.parent.name / f"{stem}{suffix}"
                      for suffix in (CITYSCAPES_TRAIN_IDS_SUFFIX, CITYSCAPES_LABEL_IDS_SUFFIX)]  # fmt: skip
        mask_path = next((path for path in candidates if path.is_file()), None)
        if labelled and mask_path is None:
            missing.append(display_path(candidates[1].relative_to(root)))
        pairs.append(SamplePair(display_path(stem), image_path, mask_path))
    if missing:
        raise DatasetError(
            f"{len(missing)} of {len(images)} {split} images have no gtFine label file, e.g. {missing[:3]}"
        )
    return pairs, read_cityscapes_labels


def ade20k_layout(data: DataConfig, *, split: str, info: ClassInfo) -> tuple[list[SamplePair], LabelReader]:
    """ADEChallengeData2016/images/<training|validation>/*.jpg with annotations/<...>/*.png (0 = other)."""
    root = Path(data.root)
    base = root / "ADEChallengeData2016" if (root / "ADEChallengeData2016").is_dir() else root
    if split not in ADE20K_FOLDERS:
        raise DatasetError(
            f"data.kind=ade20k has the splits {', '.join(ADE20K_FOLDERS)} (training, validation); its test images "
            f"have no labels; use --split val, or data.kind=folder for another set of images"
        )
    fix = f"set data.root to ADEChallengeData2016 or the folder that holds it (data.root={display_path(root)})"
    folder = ADE20K_FOLDERS[split]
    image_dir, mask_dir = base / "images" / folder, base / "annotations" / folder
    _expect_folder(image_dir, kind="ade20k", holds=f"the {split} images (*.jpg)", fix=fix)
    _expect_folder(mask_dir, kind="ade20k", holds=f"the {split} annotations (*.png)", fix=fix)
    return folder_pairs(image_dir, mask_dir), read_ade20k_labels


def voc_base(root: Path) -> Path:
    """The VOC2012 folder: ``root/VOCdevkit/VOC2012``, ``root/VOC2012`` or ``root`` itself."""
    for base in (root / "VOCdevkit" / "VOC2012", root / "VOC2012"):
        if base.is_dir():
            return base
    return root


def voc_layout(data: DataConfig, *, split: str, info: ClassInfo) -> tuple[list[SamplePair], LabelReader]:
    """VOC2012's ImageSets/Segmentation/<list>.txt stems: JPEGImages/*.jpg with SegmentationClass/*.png
    (palette indices, 255 = boundary); train may be SBD's trainaug (see data.voc_train_set)."""
    root = Path(data.root)
    base = voc_base(root)
    fix = (
        f"set data.root to VOCdevkit, VOCdevkit/VOC2012 or the folder that holds VOCdevkit "
        f"(data.root={display_path(root)})"
    )
    sets = base / "ImageSets" / "Segmentation"
    for folder, holds in ((base / "JPEGImages", "the images (*.jpg)"), (sets, "the split lists (train.txt, val.txt)")):
        _expect_folder(folder, kind="voc", holds=holds, fix=fix)
    list_name = voc_list_name(data, base=base, split=split)
    mask_dirs = [base / "SegmentationClass"] + ([base / "SegmentationClassAug"] if list_name == "trainaug" else [])
    if split != "test":
        _expect_folder(mask_dirs[0], kind="voc", holds="the label PNGs", fix=fix)
    if split == "test" and not (sets / "test.txt").is_file():
        raise DatasetError(
            f"data.kind=voc expects the test split's stems in {display_path(sets / 'test.txt')}, which does not "
            f"exist; VOC2012's test images come in their own download (without labels); use --split val"
        )
    key = "data.voc_train_set" if split == "train" else "data.root"
    entries = read_split_list(sets / f"{list_name}.txt", key=key, fix=f"VOC2012 lists each split's stems there; {fix}")
    list_path = display_path(sets / f"{list_name}.txt")
    pairs = listed_pairs(
        entries, image_dir=base / "JPEGImages", mask_dirs=mask_dirs, list_name=list_path,
        labels_optional=split == "test",
    )  # fmt: skip
    return pairs, read_mask


def voc_list_name(data: DataConfig, *, base: Path, split: str) -> str:
    """The split list of ``split``: train, val, test, or trainaug (SBD-augmented, see data.voc_train_set)."""
    if split != "train":
        return split
    has_aug = (base / "ImageSets" / "Segmentation" / "trainaug.txt").is_file() and (
        base / "SegmentationClassAug"
    ).is_dir()
    if data.voc_train_set == "trainaug" and not has_aug:
        raise DatasetError(
            f"data.voc_train_set=trainaug needs {display_path(base / 'ImageSets/Segmentation/trainaug.txt')} and "
            f"{display_path(base / 'SegmentationClassAug')} (SBD converted as mmsegmentation's voc_aug.py does); "
            f"set data.voc_train_set=train (or auto) to train on VOC2012's train.txt"
        )
    return "trainaug" if data.voc_train_set == "trainaug" or (data.voc_train_set == "auto" and has_aug) else "train"


LAYOUTS: dict[str, Layout] = {
    "folder": folder_layout, "camvid": folder_layout, "cityscapes": cityscapes_layout, "ade20k": ade20k_layout,
    "voc": voc_layout,
}  # fmt: skip


def dataset_files(data: DataConfig, *, split: str, info: ClassInfo) -> tuple[list[SamplePair], LabelReader]:
    """The samples of ``split`` for ``data.kind`` and the reader of their label files."""
    layout = LAYOUTS.get(data.kind)
    if layout is None:
        raise ConfigError(f"data.kind={data.kind!r} has no file layout; valid kinds with files: {', '.join(LAYOUTS)}")
    return layout(data, split=split, info=info)
