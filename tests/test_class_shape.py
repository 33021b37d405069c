"""scripts/class_shape.py: run widths and erosion survival of one class, by hand."""

import cv2
import numpy as np

from segohem.config import load_config

from .conftest import load_script


def test_run_widths_are_the_horizontal_runs():
    shape = load_script("class_shape")
    mask = np.zeros((3, 8), bool)
    mask[0, 1:4] = mask[0, 6:8] = mask[2, 0] = True  # runs of 3 and 2 (touching the edge), and 1
    assert shape.run_widths(mask).tolist() == [3, 2, 1]
    assert shape.run_widths(np.zeros((2, 2), bool)).tolist() == []


def test_a_two_pixel_pole_vanishes_under_a_3x3_erosion_and_a_block_does_not(tmp_path):
    shape = load_script("class_shape")
    labels = np.zeros((20, 20), np.uint8)
    labels[2:18, 3:5] = 1  # a vertical pole, 2 px wide, 32 pixels
    labels[5:10, 10:15] = 2  # a 5x5 block
    labels[0, :] = 255  # ignored row
    for folder in ("train", "trainannot"):
        (tmp_path / folder).mkdir()
    cv2.imwrite(str(tmp_path / "train" / "a.jpg"), np.zeros((20, 20, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "trainannot" / "a.png"), labels)
    config = load_config(None, ["data.kind=folder", f"data.root={tmp_path}", "data.class_names=[bg, pole, block]"])
    pole = shape.split_shape(config, "train", 1)
    assert pole["images"] == 1 and pole["median_width"] == 2.0 and pole["after_3x3"] == 0.0
    assert abs(pole["share"] - 100 * 32 / (20 * 19)) < 1e-9
    block = shape.split_shape(config, "train", 2)
    assert block["median_width"] == 5.0 and block["after_3x3"] == 100 * 9 / 25 and block["after_5x5"] == 100 / 25
    # a pole on the image's left edge keeps its edge column (the border does not erode); rows next to
    # the ignored row 0 erode
    labels[:, :] = 0
    labels[0, :] = 255
    labels[1:19, 0:2] = 1  # 2 px wide at the border: 36 pixels
    cv2.imwrite(str(tmp_path / "trainannot" / "a.png"), labels)
    edge = shape.split_shape(config, "train", 1)
    assert edge["median_width"] == 2.0 and edge["after_3x3"] == 100 * 16 / 36  # column 0, rows 2-17
