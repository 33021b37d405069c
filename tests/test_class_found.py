"""scripts/class_found.py: strict and tolerant scores of a thin class, by hand."""

import numpy as np

from .conftest import load_script


def test_a_pole_found_one_pixel_off_scores_low_strictly_and_full_with_tolerance():
    found = load_script("class_found")
    labelled = np.zeros((12, 12), bool)
    labelled[1:11, 2:5] = True  # a pole 3 px wide, 30 pixels
    labelled[1:4, 9:11] = True  # a second, small region of 6 pixels: missed
    predicted = np.zeros((12, 12), bool)
    predicted[1:11, 3:6] = True  # the first pole, one pixel to the right
    predicted[11, 0] = True  # a stray prediction on an ignored pixel: not counted
    valid = np.ones((12, 12), bool)
    valid[11, :] = False
    strict = found.found_counts(predicted, labelled, valid, tolerance=0)
    assert (strict["label"], strict["pred"], strict["hit"]) == (36, 30, 20)
    assert (strict["regions"], strict["regions_found"], strict["region_px"], strict["found_px"]) == (2, 1, 36, 30)
    s = found.scores(strict)
    assert np.isclose(s["iou"], 100 * 20 / 46) and np.isclose(s["recall"], 100 * 20 / 36)
    assert np.isclose(s["precision"], 100 * 20 / 30)
    tolerant = found.scores(found.found_counts(predicted, labelled, valid, tolerance=1))
    assert np.isclose(tolerant["tolerant_recall"], 100 * 30 / 36)  # the whole first pole, none of the second
    assert tolerant["tolerant_precision"] == 100.0
    assert tolerant["regions_found"] == 50.0 and np.isclose(tolerant["region_px_found"], 100 * 30 / 36)
    # regions below min_pixels are not counted as instances (their pixels still count for recall)
    small = found.found_counts(predicted, labelled, valid, tolerance=1, min_pixels=10)
    assert (small["regions"], small["regions_found"], small["label"]) == (1, 1, 36)


def test_nothing_predicted_or_labelled_gives_nan_not_an_error():
    found = load_script("class_found")
    empty = np.zeros((4, 4), bool)
    s = found.scores(found.found_counts(empty, empty, np.ones((4, 4), bool), tolerance=1))
    assert all(np.isnan(v) for v in s.values())


def test_row_and_column_count_where_a_class_goes_and_what_takes_its_place():
    found = load_script("class_found")
    mask = np.array([[2, 2, 1, 1], [2, 2, 0, 255]])
    predicted = np.array([[2, 1, 2, 1], [0, 2, 2, 2]])
    row, column = found.row_and_column(predicted, mask, index=2, num_classes=3, ignore_index=255)
    # labelled 2 (four pixels): predicted 2, 1, 0, 2; predicted 2 on labelled 2, 1, 2, 0 (the ignored one left out)
    assert row.tolist() == [1, 1, 2] and column.tolist() == [1, 1, 2]
    row, column = found.row_and_column(predicted, mask, index=1, num_classes=3, ignore_index=255)
    assert row.tolist() == [0, 1, 1] and column.tolist() == [0, 1, 1]
