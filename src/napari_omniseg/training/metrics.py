"""Segmentation metrics: Dice and surface distances, with per-tissue summaries.

All functions take 2-D boolean masks (anything ``np.asarray(..., bool)`` accepts)
of the same shape.  Distances are in microns: pixel distances are scaled by
``spacing_um``, the (isotropic) pixel size.

Boundary
    The boundary of a mask is ``mask XOR binary_erosion(mask, border_value=0)``,
    i.e. the foreground pixels with at least one 4-connected background neighbour.
    Pixels outside the image count as background, so an object touching the image
    edge has its edge pixels on its boundary.

Surface distances
    For every boundary pixel of one mask, the Euclidean distance to the nearest
    boundary pixel of the other mask, in both directions (pred -> gt and
    gt -> pred).

Empty-mask conventions
    ``dice``: both masks empty -> 1.0 (perfect agreement on "nothing here");
    exactly one empty -> 0.0.
    Distances (``hausdorff``, ``hd95``, ``msd``): both empty -> 0.0; exactly one
    empty -> ``nan`` (undefined: there is no surface to measure to).  ``summarize``
    excludes such NaNs from its means and counts them in ``n_undefined_distance``.

Only numpy and scipy are used, so this module can be imported without torch or Qt.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage as ndi

DISTANCE_KEYS = ("hd_um", "hd95_um", "msd_um")
METRIC_KEYS = ("dice", *DISTANCE_KEYS)


def _as_masks(pred, gt) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {gt.shape}")
    if pred.ndim != 2:
        raise ValueError(f"expected 2-D masks, got {pred.ndim}-D")
    return pred, gt


def dice(pred, gt) -> float:
    """Foreground Dice ``2|P & G| / (|P| + |G|)`` of two boolean 2-D masks.

    Conventions: both masks empty -> 1.0; exactly one empty -> 0.0 (which the
    formula gives anyway).
    """
    pred, gt = _as_masks(pred, gt)
    total = int(pred.sum()) + int(gt.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, gt).sum()) / total


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Foreground pixels with a background 4-neighbour (outside counts as background)."""
    return mask ^ ndi.binary_erosion(mask, border_value=0)


def surface_distances(pred, gt, spacing_um: float) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in microns, ``(pred_to_gt, gt_to_pred)``.

    ``pred_to_gt`` holds, for each boundary pixel of ``pred`` (in row-major
    order), the distance to the nearest boundary pixel of ``gt``; ``gt_to_pred``
    the reverse.  Computed with ``scipy.ndimage.distance_transform_edt`` using
    ``sampling=spacing_um``.

    Both masks empty -> two empty arrays.  Exactly one empty -> ``ValueError``,
    since the distances are undefined (the metric functions return NaN instead).
    """
    pred, gt = _as_masks(pred, gt)
    if spacing_um <= 0:
        raise ValueError(f"spacing_um must be positive, got {spacing_um}")
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
    if not has_pred and not has_gt:
        return np.zeros(0), np.zeros(0)
    if has_pred != has_gt:
        raise ValueError("surface distances are undefined when exactly one mask is empty")

    b_pred, b_gt = _boundary(pred), _boundary(gt)
    # Every boundary pixel (source or target) lies in the bounding box of the two
    # boundaries, so the distance transform can be taken on that crop alone.
    rows, cols = np.nonzero(b_pred | b_gt)
    crop = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    b_pred, b_gt = b_pred[crop], b_gt[crop]

    # EDT measures distance to the nearest zero, so zero out the target boundary.
    to_gt = ndi.distance_transform_edt(~b_gt, sampling=spacing_um)
    to_pred = ndi.distance_transform_edt(~b_pred, sampling=spacing_um)
    return to_gt[b_pred], to_pred[b_gt]


def _distance_scores(pred: np.ndarray, gt: np.ndarray, spacing_um: float) -> dict[str, float]:
    """hd_um, hd95_um and msd_um from one surface-distance computation."""
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
    if not has_pred and not has_gt:
        return dict.fromkeys(DISTANCE_KEYS, 0.0)
    if has_pred != has_gt:
        return dict.fromkeys(DISTANCE_KEYS, float("nan"))
    pooled = np.concatenate(surface_distances(pred, gt, spacing_um))
    return {
        "hd_um": float(pooled.max()),
        "hd95_um": float(np.percentile(pooled, 95)),
        "msd_um": float(pooled.mean()),
    }


def hausdorff(pred, gt, spacing_um: float) -> float:
    """Symmetric Hausdorff distance in microns: the largest surface distance in
    either direction.  Both empty -> 0.0; exactly one empty -> NaN."""
    pred, gt = _as_masks(pred, gt)
    return _distance_scores(pred, gt, spacing_um)["hd_um"]


def hd95(pred, gt, spacing_um: float) -> float:
    """95th-percentile Hausdorff distance in microns.

    This is the 95th percentile (numpy's default linear interpolation) of the
    *union* of both directed distance sets (pred -> gt and gt -> pred pooled),
    not the maximum of the two directed percentiles.
    Both empty -> 0.0; exactly one empty -> NaN.
    """
    pred, gt = _as_masks(pred, gt)
    return _distance_scores(pred, gt, spacing_um)["hd95_um"]


def msd(pred, gt, spacing_um: float) -> float:
    """Mean surface distance in microns: the mean of the pooled distances of both
    directions.  Both empty -> 0.0; exactly one empty -> NaN."""
    pred, gt = _as_masks(pred, gt)
    return _distance_scores(pred, gt, spacing_um)["msd_um"]


def segmentation_scores(pred, gt, spacing_um: float) -> dict[str, float]:
    """``{"dice", "hd_um", "hd95_um", "msd_um"}`` for one mask pair, computing the
    surface distances only once.  Conventions as in the individual functions."""
    pred, gt = _as_masks(pred, gt)
    return {"dice": dice(pred, gt), **_distance_scores(pred, gt, spacing_um)}


def _to_float(value) -> float:
    """``None`` (e.g. a NaN that went through a JSON round trip) counts as NaN."""
    return float("nan") if value is None else float(value)


def _nanmean(values: Iterable[float]) -> float:
    """Mean ignoring NaN; NaN (without a warning) when nothing is left."""
    arr = np.array([_to_float(v) for v in values], dtype=float)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else float("nan")


def _group_stats(rows: Sequence[Mapping]) -> dict:
    stats = {"n": len(rows)}
    for key in METRIC_KEYS:
        stats[key] = _nanmean(row[key] for row in rows)
    stats["n_undefined_distance"] = sum(
        any(math.isnan(_to_float(row[key])) for key in DISTANCE_KEYS) for row in rows
    )
    return stats


def summarize(rows: Iterable[Mapping]) -> dict:
    """Aggregate per-image scores into per-tissue and per-(tissue, stain) means.

    ``rows`` are mappings with keys ``tissue``, ``stain``, ``dice``, ``hd_um``,
    ``hd95_um`` and ``msd_um``.  Returns::

        {
          "per_tissue": {tissue: stats},
          "per_tissue_stain": {tissue: {stain: stats}},
          "mean_dice": ..., "mean_hd_um": ..., "mean_hd95_um": ..., "mean_msd_um": ...,
        }

    where ``stats`` is ``{"n", "dice", "hd_um", "hd95_um", "msd_um",
    "n_undefined_distance"}``: ``n`` counts rows, the metrics are NaN-ignoring
    means (``None`` counts as NaN), and ``n_undefined_distance`` counts rows with
    any NaN distance.  A row without ``stain`` is grouped under ``""``.  The
    overall ``mean_*`` values are unweighted means over tissues of the
    per-tissue means (so every tissue counts equally), again ignoring NaN.
    Tissues and stains keep their order of first appearance.
    """
    by_tissue: dict = {}
    by_tissue_stain: dict = {}
    for row in rows:
        by_tissue.setdefault(row["tissue"], []).append(row)
        stain = row.get("stain", "")
        by_tissue_stain.setdefault(row["tissue"], {}).setdefault(stain, []).append(row)

    per_tissue = {tissue: _group_stats(group) for tissue, group in by_tissue.items()}
    per_tissue_stain = {
        tissue: {stain: _group_stats(group) for stain, group in stains.items()}
        for tissue, stains in by_tissue_stain.items()
    }
    summary: dict = {"per_tissue": per_tissue, "per_tissue_stain": per_tissue_stain}
    for key in METRIC_KEYS:
        summary[f"mean_{key}"] = _nanmean(stats[key] for stats in per_tissue.values())
    return summary


def _fmt(value: float, decimals: int) -> str:
    value = float(value)
    return "n/a" if math.isnan(value) else f"{value:.{decimals}f}"


def format_table(summary: Mapping, tissues_order: Sequence[str] | None = None) -> str:
    """Markdown table of a ``summarize`` result, one row per tissue plus a mean row.

    Columns: tissue | n | Dice | HD (um) | HD95 (um) | MSD (um).  Dice has three
    decimals, distances one; NaN prints as ``n/a``.  With ``tissues_order`` the
    listed tissues come first in that order (names absent from the summary are
    skipped), followed by any remaining tissues in summary order.  The mean row
    shows the total ``n`` and the ``mean_*`` values of the summary.
    """
    per_tissue = summary["per_tissue"]
    order = [t for t in (tissues_order or ()) if t in per_tissue]
    order += [t for t in per_tissue if t not in order]

    def line(name: str, n: int, dice_v: float, hd_v: float, hd95_v: float, msd_v: float) -> str:
        cells = [name, str(n), _fmt(dice_v, 3), _fmt(hd_v, 1), _fmt(hd95_v, 1), _fmt(msd_v, 1)]
        return "| " + " | ".join(cells) + " |"

    lines = [
        "| tissue | n | Dice | HD (um) | HD95 (um) | MSD (um) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for tissue in order:
        s = per_tissue[tissue]
        lines.append(line(str(tissue), s["n"], s["dice"], s["hd_um"], s["hd95_um"], s["msd_um"]))
    total = sum(per_tissue[t]["n"] for t in order)
    lines.append(
        line(
            "mean",
            total,
            summary["mean_dice"],
            summary.get("mean_hd_um", float("nan")),
            summary["mean_hd95_um"],
            summary["mean_msd_um"],
        )
    )
    return "\n".join(lines)
