"""report/pictures.side_by_side: titled panels, a colour scale, an explicit ground truth."""
import os
import subprocess
import sys

import numpy as np
import pytest
from matplotlib import colormaps

from report.pictures import _BAR_W, _GAP, _TITLE_H, side_by_side

H = W = 64  # the smallest panel size in use: titles and labels must still fit


def _inputs(size=H, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    amap = rng.random((size, size)).astype(np.float32)
    mask = np.zeros((size, size), np.float32)
    mask[10:30, 20:40] = 1
    return image, mask, amap


def _px(picture):
    assert picture.mode == "RGB"
    return np.asarray(picture).astype(int)


def _bar(px, size=W):
    """The colour bar's pixels: it sits one gap right of the third (anomaly map) panel."""
    x = 3 * size + 3 * _GAP
    return px[_TITLE_H:_TITLE_H + size, x:x + _BAR_W]


def _truth_panel(px, size=W):
    return px[_TITLE_H:_TITLE_H + size, size + _GAP:2 * size + _GAP]


def test_predicted_mask_adds_exactly_one_panel_positionally():
    image, mask, amap = _inputs()
    without = side_by_side(image, mask, amap, 0.0, 1.0, "cap")
    with_pred = side_by_side(image, mask, amap, 0.0, 1.0, "cap", amap > 0.5)  # old positional call
    assert with_pred.size == (without.size[0] + W + _GAP, without.size[1])
    # the new panel is the predicted mask itself, at the right end
    right = _px(with_pred)[_TITLE_H:_TITLE_H + H, -W:]
    assert np.array_equal(right[..., 0] > 127, amap > 0.5)


def test_ground_truth_panel_is_never_left_out():
    image, mask, amap = _inputs()
    assert (side_by_side(image, None, amap, 0.0, 1.0, "c").size
            == side_by_side(image, mask, amap, 0.0, 1.0, "c").size)


def test_title_strip_is_white_with_dark_text_over_every_panel():
    image, mask, amap = _inputs()
    px = _px(side_by_side(image, mask, amap, 0.0, 1.0, "cap", amap > 0.5))
    strip = px[:_TITLE_H]
    white = (strip == 255).all(axis=2)
    assert white.mean() > 0.7  # background, not panel content
    dark = strip.sum(axis=2) < 200
    x_pred = px.shape[1] - W
    for x in (0, W + _GAP, 2 * (W + _GAP), x_pred):  # a title over each of the four panels
        assert dark[:, x:x + W].sum() > 10
    # titles fit their 64 px panels: nothing spills into the gaps between panels
    for x in (W, 2 * W + _GAP):
        assert white[:, x:x + _GAP].all()


def test_colour_bar_runs_from_jet_red_at_top_to_blue_at_bottom():
    image, mask, amap = _inputs()
    bar = _bar(_px(side_by_side(image, mask, amap, 0.2, 0.7, "cap")))
    jet = colormaps["jet"]
    top, bottom = np.array(jet(1.0)[:3]) * 255, np.array(jet(0.0)[:3]) * 255
    assert np.abs(bar[0, _BAR_W // 2] - top).max() <= 2
    assert np.abs(bar[-1, _BAR_W // 2] - bottom).max() <= 2
    assert (bar == bar[:, :1]).all()  # a clean vertical gradient, one colour per row


def test_truth_none_is_grey_with_text_and_good_is_mostly_black():
    image, _, amap = _inputs()
    none = _truth_panel(_px(side_by_side(image, None, amap, 0.0, 1.0, "c")))  # default: "none"
    assert not (none == 0).all()
    assert (none == 128).all(axis=2).mean() > 0.8  # mid-grey ...
    assert (none.sum(axis=2) < 128 * 3).any()  # ... with dark text on it
    good = _truth_panel(_px(side_by_side(image, None, amap, 0.0, 1.0, "c", truth="good")))
    black = (good == 0).all(axis=2).mean()
    assert 0.85 < black < 1.0  # the empty true mask, plus a little text


def test_truth_mask_draws_the_mask_and_bad_truth_values_are_refused():
    image, mask, amap = _inputs()
    panel = _truth_panel(_px(side_by_side(image, mask, amap, 0.0, 1.0, "c")))
    assert np.array_equal(panel[..., 0] == 255, mask > 0)
    with pytest.raises(ValueError):
        side_by_side(image, mask, amap, 0.0, 1.0, "c", truth="maybe")
    with pytest.raises(ValueError):
        side_by_side(image, None, amap, 0.0, 1.0, "c", truth="mask")


def test_threshold_tick_marks_the_bar_at_its_place():
    image, mask, amap = _inputs()
    plain = _px(side_by_side(image, mask, amap, 0.0, 1.0, "c"))
    ticked = _px(side_by_side(image, mask, amap, 0.0, 1.0, "c", threshold=0.5))
    changed_rows = np.nonzero((_bar(plain) != _bar(ticked)).any(axis=(1, 2)))[0]
    assert changed_rows.size > 0
    assert abs(changed_rows.mean() - (H - 1) / 2) <= 1.5  # 0.5 of [0, 1]: the bar's middle
    # and the "thr" label beside it: pixels right of the bar change too
    x = 3 * W + 3 * _GAP + _BAR_W + 4
    assert (plain[:, x:] != ticked[:, x:]).any()


@pytest.mark.parametrize("vmin, vmax", [(float("nan"), 1.0), (0.0, float("inf")),
                                        (-float("inf"), float("nan")), (1.0, 1.0), (2.0, 0.5)])
def test_broken_range_falls_back_instead_of_raising(vmin, vmax):
    image, mask, amap = _inputs()
    picture = side_by_side(image, mask, amap, vmin, vmax, "c", amap > 0.5, threshold=0.5)
    good = side_by_side(image, mask, amap, 0.0, 1.0, "c", amap > 0.5)
    assert picture.size == good.size and picture.mode == "RGB"
    # the fallback is the map's own range, so the heatmap still shows the map's structure
    heat = _px(picture)[_TITLE_H:_TITLE_H + H, 2 * (W + _GAP):2 * (W + _GAP) + W]
    assert heat.std() > 10


def test_degenerate_maps_do_not_raise():
    image, mask, _ = _inputs()
    flat = np.full((H, W), 0.3, np.float32)  # no range of its own either: 0..1
    side_by_side(image, mask, flat, float("nan"), float("nan"), "c")
    broken = flat.copy()
    broken[0, 0] = np.nan
    side_by_side(image, mask, broken, 0.0, 1.0, "c", threshold=float("nan"))


def test_module_does_not_import_paddle():
    # a fresh interpreter: this test session itself may already have paddle loaded
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = "import sys, report.pictures; sys.exit('paddle' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=root).returncode == 0
