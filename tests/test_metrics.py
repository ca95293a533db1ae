"""Segmentation metrics on hand-made masks whose answers are derived in the comments."""

import math
import subprocess
import sys
import warnings

import numpy as np
import pytest

from napari_omniseg.training.metrics import (
    dice,
    format_table,
    hausdorff,
    hd95,
    msd,
    segmentation_scores,
    summarize,
    surface_distances,
)


def _mask(shape, *pixels_or_slices):
    m = np.zeros(shape, bool)
    for idx in pixels_or_slices:
        m[idx] = True
    return m


def _squares():
    # Two 10x10 squares in a 20x20 image, rows 5..14; A spans cols 3..12, B cols 6..15.
    a = _mask((20, 20), np.s_[5:15, 3:13])
    b = _mask((20, 20), np.s_[5:15, 6:16])
    return a, b


def test_identical_masks():
    m = _mask((16, 16), np.s_[3:9, 4:12])
    assert dice(m, m) == 1.0
    for f in (hausdorff, hd95, msd):
        assert f(m, m, 0.5) == 0.0
    d_pg, d_gp = surface_distances(m, m, 0.5)
    # 6x8 rectangle: boundary = 6*8 - 4*6 interior = 24 pixels, each at distance 0.
    assert d_pg.shape == d_gp.shape == (24,)
    assert not d_pg.any() and not d_gp.any()


def test_offset_squares():
    a, b = _squares()
    # Overlap is 10 rows x 7 cols = 70 px; Dice = 2*70 / (100+100) = 0.7.
    assert dice(a, b) == pytest.approx(0.7)
    # Local coords (rows 0..9, A cols 0..9, B cols 3..12).  Directed A -> B over
    # A's 36 boundary pixels:
    #   top and bottom rows: cols 0,1,2 -> 3,2,1 (to B's corner column); cols 3..9 lie
    #     on B's top/bottom row -> 0.  Sum 6 per row.
    #   left column, rows 1..8 -> 3 each (B's left column).  Sum 24.
    #   right column (col 9), rows 1..8 -> min(distance to B's top/bottom row,
    #     3 to B's right column) = 1,2,3,3,3,3,2,1.  Sum 18.
    # Directed sum 54 over 36 pixels; B -> A is the mirror image, same values.
    d_ab, d_ba = surface_distances(a, b, 1.0)
    assert d_ab.size == d_ba.size == 36
    assert d_ab.sum() == pytest.approx(54.0)
    assert d_ba.sum() == pytest.approx(54.0)
    # Pooled values: 28 zeros, 8 ones, 8 twos, 28 threes (72 in all).
    pooled = np.sort(np.concatenate([d_ab, d_ba]))
    expected = np.repeat([0.0, 1.0, 2.0, 3.0], [28, 8, 8, 28])
    np.testing.assert_allclose(pooled, expected)
    # Hausdorff = 3 px; MSD = 108 / 72 = 1.5 px; HD95 at rank 0.95*71 = 67.45 -> 3 px.
    # With 2 um pixels: 6.0, 3.0 and 6.0 um.
    assert hausdorff(a, b, 2.0) == pytest.approx(6.0)
    assert msd(a, b, 2.0) == pytest.approx(3.0)
    assert hd95(a, b, 2.0) == pytest.approx(6.0)


def test_single_pixels_at_3_4():
    # (2,2) vs (5,6): offset (3,4) -> 5 px; every boundary set has one pixel.
    p = _mask((10, 10), (2, 2))
    g = _mask((10, 10), (5, 6))
    assert dice(p, g) == 0.0
    assert hausdorff(p, g, 1.0) == pytest.approx(5.0)
    assert hausdorff(p, g, 0.5) == pytest.approx(2.5)
    assert hd95(p, g, 0.5) == pytest.approx(2.5)
    assert msd(p, g, 0.5) == pytest.approx(2.5)


def test_hd95_and_msd_pool_both_directions():
    # pred = {(5,5)}, gt = {(5,5), (5,9)}.  pred -> gt: [0]; gt -> pred: [0, 4].
    # Pooled [0, 0, 4]: 95th percentile at rank 0.95*2 = 1.9 -> 0 + 0.9*4 = 3.6.
    # (The max of the two directed 95th percentiles would be 3.8 instead.)
    # MSD = 4/3, Hausdorff = 4.
    p = _mask((12, 12), (5, 5))
    g = _mask((12, 12), (5, 5), (5, 9))
    assert hd95(p, g, 1.0) == pytest.approx(3.6)
    assert msd(p, g, 1.0) == pytest.approx(4 / 3)
    assert hausdorff(p, g, 1.0) == pytest.approx(4.0)
    # Symmetric in its arguments.
    assert hd95(g, p, 1.0) == pytest.approx(3.6)
    assert msd(g, p, 1.0) == pytest.approx(4 / 3)


def test_image_edge_pixels_are_boundary():
    # pred fills the whole 5x5 image; its boundary is the outer ring of 16 pixels
    # (outside the image counts as background).  gt is the 3x3 centre, whose
    # boundary is its ring of 8 pixels.
    # pred -> gt: 4 corners at sqrt(2) (diagonal to the gt corner), 12 others at 1.
    # gt -> pred: all 8 at 1.  Hausdorff sqrt(2); MSD (20 + 4 sqrt 2) / 24.
    p = np.ones((5, 5), bool)
    g = _mask((5, 5), np.s_[1:4, 1:4])
    d_pg, d_gp = surface_distances(p, g, 1.0)
    assert d_pg.size == 16 and d_gp.size == 8
    assert hausdorff(p, g, 1.0) == pytest.approx(math.sqrt(2))
    assert msd(p, g, 1.0) == pytest.approx((20 + 4 * math.sqrt(2)) / 24)
    # Dice: 2*9 / (25+9).
    assert dice(p, g) == pytest.approx(18 / 34)


def test_empty_conventions():
    empty = np.zeros((8, 8), bool)
    full = _mask((8, 8), np.s_[2:5, 2:5])
    # Both empty: perfect agreement, distances 0.
    assert dice(empty, empty) == 1.0
    assert segmentation_scores(empty, empty, 0.5) == {"dice": 1.0, "hd_um": 0.0, "hd95_um": 0.0, "msd_um": 0.0}
    d_pg, d_gp = surface_distances(empty, empty, 0.5)
    assert d_pg.size == 0 and d_gp.size == 0
    # Exactly one empty: Dice 0, distances undefined (NaN), either way round.
    for p, g in ((empty, full), (full, empty)):
        assert dice(p, g) == 0.0
        for f in (hausdorff, hd95, msd):
            assert math.isnan(f(p, g, 0.5))
        s = segmentation_scores(p, g, 0.5)
        assert s["dice"] == 0.0
        assert all(math.isnan(s[k]) for k in ("hd_um", "hd95_um", "msd_um"))
        with pytest.raises(ValueError):
            surface_distances(p, g, 0.5)


def test_spacing_scales_distances_not_dice():
    yy, xx = np.mgrid[:40, :40]
    disc = (yy - 18) ** 2 + (xx - 20) ** 2 <= 100
    square = _mask((40, 40), np.s_[12:30, 10:26])
    s1 = segmentation_scores(disc, square, 1.0)
    s2 = segmentation_scores(disc, square, 2.0)
    assert s2["dice"] == s1["dice"]
    assert s1["hd_um"] > 0
    for k in ("hd_um", "hd95_um", "msd_um"):
        assert s2[k] == pytest.approx(2 * s1[k])


def test_segmentation_scores_matches_individual_functions():
    a, b = _squares()
    s = segmentation_scores(a, b, 0.25)
    assert s == {
        "dice": pytest.approx(dice(a, b)),
        "hd_um": pytest.approx(hausdorff(a, b, 0.25)),
        "hd95_um": pytest.approx(hd95(a, b, 0.25)),
        "msd_um": pytest.approx(msd(a, b, 0.25)),
    }
    # Label images (0/1 integers) are accepted as masks.
    assert segmentation_scores(a.astype(np.uint8), b.astype(np.uint8), 0.25) == s


def test_input_validation():
    with pytest.raises(ValueError):
        dice(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError):
        hausdorff(np.ones((4, 4)), np.ones((4, 4)), 0.0)


NAN = float("nan")
ROWS = [
    {"tissue": "glom", "stain": "PAS", "dice": 0.8, "hd_um": 4.0, "hd95_um": 3.0, "msd_um": 1.0},
    {"tissue": "glom", "stain": "HE", "dice": 0.6, "hd_um": NAN, "hd95_um": NAN, "msd_um": NAN},
    {"tissue": "glom", "stain": "PAS", "dice": 1.0, "hd_um": 2.0, "hd95_um": 1.0, "msd_um": 0.6},
    {"tissue": "tubule", "stain": "PAS", "dice": 0.5, "hd_um": 10.0, "hd95_um": 8.0, "msd_um": 3.0},
    {"tissue": "vessel", "stain": "HE", "dice": 0.0, "hd_um": NAN, "hd95_um": NAN, "msd_um": NAN},
]


def _nan_safe(d):
    """Dict with NaN replaced by a sentinel, so == compares it."""
    return {k: ("nan" if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def test_summarize():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # all-NaN groups must not warn
        s = summarize(ROWS)
    per = s["per_tissue"]
    assert list(per) == ["glom", "tubule", "vessel"]
    # glom: dice (0.8+0.6+1.0)/3 = 0.8; distances over the two defined rows:
    # hd (4+2)/2 = 3, hd95 (3+1)/2 = 2, msd (1+0.6)/2 = 0.8; one undefined row.
    assert per["glom"] == {
        "n": 3, "dice": pytest.approx(0.8), "hd_um": pytest.approx(3.0),
        "hd95_um": pytest.approx(2.0), "msd_um": pytest.approx(0.8), "n_undefined_distance": 1,
    }
    assert per["tubule"] == {"n": 1, "dice": 0.5, "hd_um": 10.0, "hd95_um": 8.0, "msd_um": 3.0, "n_undefined_distance": 0}
    assert _nan_safe(per["vessel"]) == {"n": 1, "dice": 0.0, "hd_um": "nan", "hd95_um": "nan", "msd_um": "nan", "n_undefined_distance": 1}

    pts = s["per_tissue_stain"]
    assert set(pts) == {"glom", "tubule", "vessel"}
    assert list(pts["glom"]) == ["PAS", "HE"]
    # glom/PAS: dice (0.8+1.0)/2 = 0.9, hd 3, hd95 2, msd 0.8.
    assert pts["glom"]["PAS"] == {
        "n": 2, "dice": pytest.approx(0.9), "hd_um": pytest.approx(3.0),
        "hd95_um": pytest.approx(2.0), "msd_um": pytest.approx(0.8), "n_undefined_distance": 0,
    }
    assert _nan_safe(pts["glom"]["HE"]) == {"n": 1, "dice": 0.6, "hd_um": "nan", "hd95_um": "nan", "msd_um": "nan", "n_undefined_distance": 1}
    assert pts["tubule"]["PAS"]["n"] == 1 and pts["vessel"]["HE"]["n_undefined_distance"] == 1

    # Means over tissues (each tissue weighs the same; vessel's NaN distances skipped):
    # dice (0.8+0.5+0.0)/3; hd (3+10)/2 = 6.5; hd95 (2+8)/2 = 5; msd (0.8+3)/2 = 1.9.
    assert s["mean_dice"] == pytest.approx(1.3 / 3)
    assert s["mean_hd_um"] == pytest.approx(6.5)
    assert s["mean_hd95_um"] == pytest.approx(5.0)
    assert s["mean_msd_um"] == pytest.approx(1.9)


def test_summarize_all_undefined_and_empty():
    rows = [{"tissue": "t", "stain": "HE", "dice": 0.0, "hd_um": NAN, "hd95_um": NAN, "msd_um": None}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = summarize(rows)
        empty = summarize([])
    assert s["per_tissue"]["t"]["n_undefined_distance"] == 1
    assert math.isnan(s["mean_hd95_um"]) and math.isnan(s["mean_msd_um"])
    assert s["mean_dice"] == 0.0
    assert empty["per_tissue"] == {} and math.isnan(empty["mean_dice"])


def test_format_table():
    table = format_table(summarize(ROWS), tissues_order=["tubule", "glom", "vessel", "absent"])
    assert table.splitlines() == [
        "| tissue | n | Dice | HD (um) | HD95 (um) | MSD (um) |",
        "|---|---:|---:|---:|---:|---:|",
        "| tubule | 1 | 0.500 | 10.0 | 8.0 | 3.0 |",
        "| glom | 3 | 0.800 | 3.0 | 2.0 | 0.8 |",
        "| vessel | 1 | 0.000 | n/a | n/a | n/a |",
        "| mean | 5 | 0.433 | 6.5 | 5.0 | 1.9 |",
    ]
    # Without an order, tissues appear as first seen in the rows.
    rows = format_table(summarize(ROWS)).splitlines()
    assert [r.split(" | ")[0] for r in rows[2:]] == ["| glom", "| tubule", "| vessel", "| mean"]


def test_module_imports_without_torch_or_qt():
    code = (
        "import sys, napari_omniseg.training.metrics\n"
        "bad = [m for m in ('torch', 'qtpy', 'PyQt5', 'napari') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
