import numpy as np

from segohem.visualize import (
    CORRECT_RGB,
    HARD_RGB,
    IGNORED_RGB,
    WRONG_RGB,
    PredictionPanel,
    colorize_mask,
    confusion_image,
    error_map,
    hard_pixel_overlay,
    hardness_overlay,
    heatmap,
    legend,
    montage,
    overlay_mask,
    render_panel,
)

PALETTE = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def image(h=4, w=6, value=100):
    return np.full((h, w, 3), value, np.uint8)


def test_colorize_puts_palette_colours_where_they_belong():
    mask = np.array([[0, 1], [2, 255]])
    out = colorize_mask(mask, PALETTE, ignore_index=255)
    assert out[0, 0].tolist() == [255, 0, 0] and out[0, 1].tolist() == [0, 255, 0]
    assert out[1, 0].tolist() == [0, 0, 255] and out[1, 1].tolist() == [0, 0, 0]


def test_overlay_alpha_zero_is_identity_alpha_one_is_palette_and_ignored_untouched():
    base = np.random.default_rng(0).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    mask = np.zeros((4, 6), np.int64)
    mask[0] = 255
    assert np.array_equal(overlay_mask(base, mask, PALETTE, alpha=0.0, ignore_index=255), base)
    full = overlay_mask(base, mask, PALETTE, alpha=1.0, ignore_index=255)
    assert (full[1:] == [255, 0, 0]).all() and np.array_equal(full[0], base[0])
    half = overlay_mask(image(), np.ones((4, 6), np.int64), PALETTE, alpha=0.5)
    assert half[0, 0].tolist() == [50, 178, 50]  # round(0.5*100 + 0.5*255) = 178 (half to even)
    assert base.flags.writeable and not np.shares_memory(full, base)


def test_hard_pixel_overlay_changes_only_hard_pixels():
    hard = np.zeros((4, 6), bool)
    hard[2, 3] = True
    out = hard_pixel_overlay(image(), hard, alpha=1.0)
    assert out[2, 3].tolist() == list(HARD_RGB)
    assert (out[~hard] == 100).all()


def test_error_map_colours():
    target = np.array([[0, 1, 255]])
    pred = np.array([[0, 2, 1]])
    out = error_map(pred, target, ignore_index=255)
    assert [out[0, i].tolist() for i in range(3)] == [list(CORRECT_RGB), list(WRONG_RGB), list(IGNORED_RGB)]


def test_heatmap_is_monotone_and_nan_is_black():
    values = np.array([[0.0, 0.5, 1.0, np.nan]])
    out = heatmap(values, vmax=1.0).astype(int)
    brightness = out[0, :3].sum(1)
    assert brightness[0] < brightness[1] < brightness[2]
    assert out[0, 3].tolist() == [0, 0, 0]


def test_hardness_overlay_leaves_unseen_cells_alone():
    hardness = np.array([[1.0, np.nan]])  # 2 cells over a 4x6 image: left half seen, right half not
    base = image(4, 6)
    out = hardness_overlay(base, hardness, alpha=1.0)
    assert np.array_equal(out[:, 3:], base[:, 3:])
    assert (out[:, :3] != base[:, :3]).any()


def test_montage_legend_confusion_and_panel_shapes():
    tiles = [image(10, 20), image(5, 5)]
    grid = montage(tiles, ["a", "b"], columns=2)
    assert grid.shape == (10 + 16, 2 * 20, 3)  # title bar on top, tiles padded to the widest
    assert legend(["x", "y", "z"], PALETTE).shape[0] == 3 * 18 + 4
    assert confusion_image(np.eye(3, dtype=np.int64), ["a", "b", "c"]).ndim == 3
    panel = PredictionPanel("s", image(8, 8), np.zeros((8, 8), np.int64), np.ones((8, 8), np.int64),
                            np.ones((8, 8), bool), np.ones((8, 8), np.float32))  # fmt: skip
    picture = render_panel(panel, names=["a", "b", "c"], palette=PALETTE, ignore_index=255)
    assert picture.dtype == np.uint8 and picture.shape[2] == 3
