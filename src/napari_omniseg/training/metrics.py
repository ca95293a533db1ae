"""Segmentation metrics in microns.

Conventions (both masks are boolean 2-D arrays on one pixel grid):

- Dice: 2|A∩B| / (|A|+|B|); both empty -> 1.0, exactly one empty -> 0.0.
- Surface distances: boundary pixels are ``mask XOR erosion(mask)`` (pixels on the
  image edge count as boundary).  Each boundary pixel of one mask gets its distance
  to the nearest boundary pixel of the other, in both directions, in microns
  (``spacing_um`` per pixel).  HD is the largest of these, HD95 the 95th percentile
  of the pooled (both directions) distances, MSD their mean.
- Distances when both masks are empty: 0.0; when exactly one is empty: NaN
  (undefined), excluded from means and counted in ``n_undefined_distance``.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage as ndi


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    p, g = np.asarray(pred, bool), np.asarray(gt, bool)
    s = int(p.sum()) + int(g.sum())
    if s == 0:
        return 1.0
    return 2.0 * int((p & g).sum()) / s


def _boundary(m: np.ndarray) -> np.ndarray:
    return m & ~ndi.binary_erosion(m, border_value=0)


def surface_distances(pred: np.ndarray, gt: np.ndarray, spacing_um: float) -> np.ndarray | None:
    """Pooled symmetric boundary distances in microns; None if exactly one mask is empty;
    an empty array if both are."""
    p, g = np.asarray(pred, bool), np.asarray(gt, bool)
    if not p.any() and not g.any():
        return np.zeros(0)
    if not p.any() or not g.any():
        return None
    bp, bg = _boundary(p), _boundary(g)
    dt_g = ndi.distance_transform_edt(~bg, sampling=spacing_um)
    dt_p = ndi.distance_transform_edt(~bp, sampling=spacing_um)
    return np.concatenate([dt_g[bp], dt_p[bg]])


def _dist_stats(d: np.ndarray | None) -> tuple[float, float, float]:
    if d is None:
        return math.nan, math.nan, math.nan
    if d.size == 0:
        return 0.0, 0.0, 0.0
    return float(d.max()), float(np.percentile(d, 95)), float(d.mean())


def hausdorff(pred, gt, spacing_um: float) -> float:
    return _dist_stats(surface_distances(pred, gt, spacing_um))[0]


def hd95(pred, gt, spacing_um: float) -> float:
    return _dist_stats(surface_distances(pred, gt, spacing_um))[1]


def msd(pred, gt, spacing_um: float) -> float:
    return _dist_stats(surface_distances(pred, gt, spacing_um))[2]


def segmentation_scores(pred, gt, spacing_um: float) -> dict:
    hd, h95, m = _dist_stats(surface_distances(pred, gt, spacing_um))
    return {"dice": dice(pred, gt), "hd_um": hd, "hd95_um": h95, "msd_um": m}


def _nanmean(v: Iterable[float]) -> float:
    a = np.array([x for x in v if x is not None and not math.isnan(x)], float)
    return float(a.mean()) if a.size else math.nan


def _agg(rows: Sequence[dict]) -> dict:
    return {
        "n": len(rows),
        "dice": _nanmean(r["dice"] for r in rows),
        "hd_um": _nanmean(r["hd_um"] for r in rows),
        "hd95_um": _nanmean(r["hd95_um"] for r in rows),
        "msd_um": _nanmean(r["msd_um"] for r in rows),
        "n_undefined_distance": sum(1 for r in rows if r["hd_um"] is None or math.isnan(r["hd_um"])),
    }


def summarize(rows: Sequence[dict]) -> dict:
    """Per tissue, per tissue and stain, and means over tissues (each tissue weighs the same)."""
    by_t: dict[str, list] = {}
    for r in rows:
        by_t.setdefault(r["tissue"], []).append(r)
    per_t = {t: _agg(rs) for t, rs in by_t.items()}
    per_ts = {}
    for t, rs in by_t.items():
        by_s: dict[str, list] = {}
        for r in rs:
            by_s.setdefault(r.get("stain", ""), []).append(r)
        per_ts[t] = {s: _agg(x) for s, x in by_s.items()}
    return {
        "per_tissue": per_t,
        "per_tissue_stain": per_ts,
        "mean_dice": _nanmean(v["dice"] for v in per_t.values()),
        "mean_hd_um": _nanmean(v["hd_um"] for v in per_t.values()),
        "mean_hd95_um": _nanmean(v["hd95_um"] for v in per_t.values()),
        "mean_msd_um": _nanmean(v["msd_um"] for v in per_t.values()),
    }


def _f(x, nd):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def format_table(summary: dict, tissues_order: Sequence[str] | None = None) -> str:
    """Markdown table: tissue | n | Dice | HD | HD95 | MSD (um), then the mean over tissues."""
    per = summary["per_tissue"]
    order = [t for t in (tissues_order or sorted(per)) if t in per]
    lines = ["| tissue | n | Dice | HD (um) | HD95 (um) | MSD (um) |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for t in order:
        v = per[t]
        lines.append(f"| {t} | {v['n']} | {_f(v['dice'], 3)} | {_f(v['hd_um'], 1)} | {_f(v['hd95_um'], 1)} | {_f(v['msd_um'], 1)} |")
    lines.append(f"| **mean** | {sum(per[t]['n'] for t in order)} | {_f(summary['mean_dice'], 3)} | "
                 f"{_f(summary.get('mean_hd_um'), 1)} | {_f(summary['mean_hd95_um'], 1)} | {_f(summary['mean_msd_um'], 1)} |")
    return "\n".join(lines)
