import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from segohem.cli import main

CLASSES = ["data.kind=folder", "data.class_names=[a, b, c]", "train.progress=false"]
PALETTE = "data.palette=[[10, 20, 30], [40, 50, 60], [70, 80, 90]]"


def write_pair(root: Path, split: str, stem: str, mask: np.ndarray, *, suffix: str = ".png") -> None:
    """An image of ``mask``'s size and ``mask`` itself (a single-channel PNG of class ids)."""
    images, masks = root / split, root / f"{split}annot"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    image = np.random.default_rng(len(stem)).integers(0, 256, (*mask.shape[:2], 3), dtype=np.uint8)
    cv2.imwrite(str(images / f"{stem}{suffix}"), image)
    cv2.imwrite(str(masks / f"{stem}.png"), mask)


def clean_dataset(root: Path) -> Path:
    """train: x has 768 px of class 0 and 256 of class 1; y has 512 px of class 1, 256 of class 2
    and 256 ignored (255). val: one image of class 2 only."""
    x = np.zeros((32, 32), np.uint8)
    x[:8] = 1
    y = np.ones((32, 32), np.uint8)
    y[16:24], y[24:] = 2, 255
    write_pair(root, "train", "x", x)
    write_pair(root, "train", "y", y)
    write_pair(root, "val", "v", np.full((32, 32), 2, np.uint8))
    return root


def check(capsys, root: Path, *extra: str, split: str = "all", workers: int = 1) -> tuple[int, dict, str]:
    """Exit status, the JSON report and stderr of ``segohem check-data`` on the folder dataset at ``root``."""
    args = ["check-data", "--split", split, "--format", "json", "--workers", str(workers)]
    code = main([*args, *CLASSES, f"data.root={root}", *extra])
    captured = capsys.readouterr()
    return code, json.loads(captured.out), captured.err


def test_a_clean_dataset_passes_with_its_class_statistics(tmp_path, capsys):
    code, report, err = check(capsys, clean_dataset(tmp_path))
    assert code == 0 and report["errors"] == report["warnings"] == 0 and err == ""
    assert [s["split"] for s in report["splits"]] == ["train", "val"]  # no test folders: test is optional
    train = report["splits"][0]
    assert (train["images"], train["label_files"], train["pairs"], train["pixels"]) == (2, 2, 2, 2048)
    assert train["ignore_fraction"] == 256 / 2048
    rows = {row["name"]: row for row in train["classes"]}
    assert [rows[n]["pixels"] for n in "abc"] == [768, 768, 256]
    assert [rows[n]["images"] for n in "abc"] == [1, 2, 1]
    assert rows["b"]["share"] == 768 / 2048 and rows["b"]["presence"] == 1.0
    # Median-frequency balancing: freq = class pixels / pixels of the images holding the class
    # = 768/1024, 768/2048, 256/1024; median 0.375.
    assert [rows[n]["weight"] for n in "abc"] == pytest.approx([0.5, 1.0, 1.5])
    assert train["suggested_override"] == "ohem.class_weight=[0.5, 1, 1.5]"
    assert report["splits"][1]["classes"][0]["weight"] is None  # class a is absent from val


def test_the_table_shows_classes_weights_and_the_summary(tmp_path, capsys):
    root = clean_dataset(tmp_path)
    assert main(["check-data", "--workers", "1", *CLASSES, f"data.root={root}"]) == 0
    out = capsys.readouterr().out
    assert "median-frequency balancing" in out and "ohem.class_weight=[0.5, 1, 1.5]" in out
    assert "ignored (id 255): 12.50% of pixels" in out and "0 error(s), 0 warning(s)" in out


def corrupt(root: Path, case: str) -> str:
    """Break the clean dataset one way; returns the file (relative to root) the report must name."""
    if case == "empty_image":
        (root / "train" / "x.png").write_bytes(b"")
        return "train/x.png"
    if case == "empty_mask":
        (root / "trainannot" / "y.png").write_bytes(b"")
        return "trainannot/y.png"
    if case == "unreadable_image":
        (root / "train" / "x.png").write_bytes(b"\x89PNG but not really")
        return "train/x.png"
    if case == "image_without_mask":
        write_pair(root, "train", "z", np.zeros((32, 32), np.uint8))
        (root / "trainannot" / "z.png").unlink()
        return "train/z.png"
    if case == "mask_without_image":
        write_pair(root, "val", "w", np.zeros((32, 32), np.uint8))
        (root / "val" / "w.png").unlink()
        return "valannot/w.png"
    if case == "size_mismatch":
        cv2.imwrite(str(root / "trainannot" / "x.png"), np.zeros((32, 40), np.uint8))
        return "trainannot/x.png"
    if case == "labels_outside_classes":
        mask = np.zeros((32, 32), np.uint8)
        mask[0, :5] = 7
        cv2.imwrite(str(root / "trainannot" / "x.png"), mask)
        return "trainannot/x.png"
    if case == "colour_mask":
        cv2.imwrite(str(root / "valannot" / "v.png"), np.full((32, 32, 3), 200, np.uint8))
        return "valannot/v.png"
    if case == "duplicate_stem":
        write_pair(root, "train", "x", np.zeros((32, 32), np.uint8), suffix=".jpg")
        return "train/x.png"  # the second of x.jpg, x.png
    if case == "missing_folder":
        for path in (root / "valannot").iterdir():
            path.unlink()
        (root / "valannot").rmdir()
        return "valannot"
    assert case == "mixed_sizes"
    write_pair(root, "train", "z", np.zeros((48, 32), np.uint8))
    return "train"


BAD_INPUTS = {  # case: (problem kind, exit status)
    "empty_image": ("empty_file", 2),
    "empty_mask": ("empty_file", 2),
    "unreadable_image": ("unreadable", 2),
    "image_without_mask": ("image_without_mask", 2),
    "mask_without_image": ("mask_without_image", 0),  # training ignores a label file without an image
    "size_mismatch": ("size_mismatch", 2),
    "labels_outside_classes": ("labels_outside_classes", 2),
    "colour_mask": ("colour_mask", 2),
    "duplicate_stem": ("duplicate_stem", 2),
    "missing_folder": ("missing_folder", 2),
    "mixed_sizes": ("mixed_sizes", 2),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_each_bad_input_is_reported_naming_the_file(tmp_path, capsys, case):
    root = clean_dataset(tmp_path)
    named = corrupt(root, case)
    kind, status = BAD_INPUTS[case]
    code, report, err = check(capsys, root)
    assert code == status
    problems = [p for s in report["splits"] for p in s["problems"]]
    assert [p["kind"] for p in problems] == [kind], problems
    assert problems[0]["file"] == str(root / named)
    if status == 2:
        assert err.count("\n") == 1 and err.startswith("segohem check-data: error: 1 problem(s) would stop training")
        assert problems[0]["file"] in err
    else:
        assert err == ""
    assert report["errors" if status else "warnings"] == 1


def test_label_values_outside_the_classes_are_counted_with_examples(tmp_path, capsys):
    root = clean_dataset(tmp_path)
    corrupt(root, "labels_outside_classes")
    code, report, _ = check(capsys, root, split="train")
    assert code == 2
    (outside,) = report["splits"][0]["labels_outside_classes"]
    assert outside == {"value": 7, "pixels": 5, "files": 1, "examples": [str(root / "trainannot" / "x.png")]}
    assert "7 (5 px)" in report["splits"][0]["problems"][0]["detail"]
    assert report["splits"][0]["pixels"] == 2048  # the 5 px are counted, in no class


def colour_masks(root: Path) -> None:
    """x's label file as the colours of PALETTE: class 0 on top, class 1 below."""
    colours = np.zeros((32, 32, 3), np.uint8)
    colours[:16] = (10, 20, 30)
    colours[16:] = (40, 50, 60)
    cv2.imwrite(str(root / "trainannot" / "x.png"), colours[..., ::-1])  # OpenCV writes BGR


def test_a_colour_mask_in_the_palette_names_the_mask_format_and_that_format_reads_it(tmp_path, capsys):
    root = clean_dataset(tmp_path)
    colour_masks(root)
    code, report, _ = check(capsys, root, PALETTE, split="train")
    assert code == 2
    (problem,) = report["splits"][0]["problems"]
    assert problem["kind"] == "colour_mask" and "set data.mask_format=rgb" in problem["detail"]
    for path in (root / "trainannot").iterdir():  # every label file as colours: y's 255 becomes an ignore colour
        if path.name != "x.png":
            ids = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            table = np.array([(10, 20, 30), (40, 50, 60), (70, 80, 90)] + [(0, 0, 0)] * 253, np.uint8)
            cv2.imwrite(str(path), table[ids][..., ::-1])
    rgb = ["data.mask_format=rgb", "data.ignore_colors=[[0, 0, 0]]"]
    code, report, _ = check(capsys, root, PALETTE, *rgb, split="train")
    assert code == 0
    assert [row["pixels"] for row in report["splits"][0]["classes"]] == [512, 1024, 256]
    assert report["splits"][0]["ignore_fraction"] == 256 / 2048


def test_an_id_mask_where_colours_are_expected_is_reported_with_the_readers_message(tmp_path, capsys):
    root = clean_dataset(tmp_path)
    colour_masks(root)  # x as colours; y stays a single-channel file of ids
    code, report, _ = check(capsys, root, PALETTE, "data.mask_format=rgb", split="train")
    assert code == 2
    (problem,) = report["splits"][0]["problems"]
    assert problem["kind"] == "bad_labels" and problem["file"] == str(root / "trainannot" / "y.png")
    assert "neither in data.palette nor in data.ignore_colors" in problem["detail"]
    assert not problem["detail"].startswith(problem["file"])  # the file column names it once


def test_every_problem_is_listed_not_only_the_first_and_workers_agree(tmp_path, capsys):
    root = clean_dataset(tmp_path)
    cases = ["empty_image", "image_without_mask", "mask_without_image", "labels_outside_classes", "colour_mask"]
    named = {str(root / corrupt(root, case)) for case in cases}
    code, report, _ = check(capsys, root, workers=1)
    assert code == 2 and (report["errors"], report["warnings"]) == (4, 1)
    assert {p["file"] for s in report["splits"] for p in s["problems"]} == named
    code_pool, report_pool, _ = check(capsys, root, workers=2)
    report.pop("seconds"), report_pool.pop("seconds")
    assert code_pool == code and report_pool == report
    assert main(["check-data", "--workers", "2", *CLASSES, f"data.root={root}"]) == 2
    table = capsys.readouterr().out
    assert all(file in table for file in named) and "4 error(s), 1 warning(s)" in table
    assert "label value 7 (not a class, not the ignore id): 5 px in 1 file(s)" in table


def test_a_split_list_problem_is_reported_as_listing(tmp_path, capsys):
    root = clean_dataset(tmp_path)
    (root / "train.txt").write_text("x\nnothere\n")
    code, report, _ = check(capsys, root, "data.train_list=train.txt", split="train")
    assert code == 2
    (problem,) = report["splits"][0]["problems"]
    assert problem["kind"] == "listing" and "nothere" in problem["detail"]


def test_a_synthetic_config_is_refused(capsys):
    assert main(["check-data", "train.progress=false"]) == 2
    assert "data.kind=synthetic" in capsys.readouterr().err


@pytest.mark.slow
def test_camvid_train_and_val_are_clean(camvid_root, capsys):
    config = str(Path(__file__).resolve().parents[1] / "configs" / "camvid.yaml")
    args = ["check-data", "--config", config, "--format", "json", f"data.root={camvid_root}", "train.progress=false"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(s["split"], s["pairs"]) for s in report["splits"]][:2] == [("train", 367), ("val", 101)]
    assert report["errors"] == 0
    train = report["splits"][0]
    assert train["sizes"] == [{"height": 360, "width": 480, "images": 367}]
    assert all(row["images"] > 0 for row in train["classes"]) and 0 < train["ignore_fraction"] < 0.1
    weights = {row["name"]: row["weight"] for row in train["classes"]}
    assert weights["bicyclist"] > weights["pole"] > 1 > weights["building"] > weights["road"]
