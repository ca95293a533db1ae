"""A low-resolution tissue mask, so background tiles are never sent to the model.

``tissue_mask(source)`` reads the slide at about 16 um/px (a few hundred to a few
thousand pixels across for a whole slide; it picks the nearest pyramid level and
reads it in pieces, so memory stays small even for a single-level slide) and calls
a pixel *tissue* when

- its HSV saturation is above an Otsu threshold computed over the non-black
  pixels, clipped to ``[min_saturation, max_saturation_threshold]`` (0.05-0.1:
  the floor keeps faint glass tints out; the cap keeps Otsu from splitting pale
  from dark stain instead of tissue from glass, which missed pale PAS tissue on
  the renal demo patches), **or**
- it is dark: grey level below an Otsu threshold over the non-black pixels,
  clipped to ``[min_dark_threshold, max_dark_threshold]`` (0.45-0.8), which
  catches weakly saturated stains such as silver;

pure black (padding, scanner borders) and white or near-white glass are never
tissue.  Connected pieces smaller than ``min_object_um2`` (and than 0.2 % of the
image, so a small field of view keeps its tissue) are removed and holes
smaller than ``max_hole_um2`` (lumens, vessels) are filled.
"""

from __future__ import annotations

import logging
import math

import numpy as np

log = logging.getLogger(__name__)


def _otsu(values: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    if values.size < 2 or float(values.max()) - float(values.min()) < 1e-6:
        return 0.0
    return float(threshold_otsu(values))


def _remove_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    from scipy import ndimage

    if min_px <= 1 or not mask.any():
        return mask
    lab, n = ndimage.label(mask)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    keep = sizes >= min_px
    keep[0] = False
    return keep[lab]


def _fill_small_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    from scipy import ndimage

    if max_px < 1:
        return mask
    lab, n = ndimage.label(~mask)
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    fill = sizes <= max_px
    fill[0] = False
    fill[border] = False
    return mask | fill[lab]


def tissue_mask_from_rgb(
    rgb: np.ndarray,
    mpp: float,
    min_saturation: float = 0.05,
    max_saturation_threshold: float = 0.1,
    min_dark_threshold: float = 0.45,
    max_dark_threshold: float = 0.8,
    min_object_um2: float = 5000.0,
    max_hole_um2: float = 20000.0,
) -> np.ndarray:
    """Boolean tissue mask of an ``(H, W, 3) uint8`` thumbnail with ``mpp`` um per pixel."""
    a = np.asarray(rgb, dtype=np.float32)[..., :3] / 255.0
    mx, mn = a.max(axis=-1), a.min(axis=-1)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
    gray = a @ np.array([0.2125, 0.7154, 0.0721], np.float32)
    black = mx < 0.1
    white = mn > 0.94
    valid = ~black & ~white
    some = (~black).any()
    s_thr = min(max(_otsu(sat[~black]) if some else 0.0, min_saturation), max_saturation_threshold)
    d_thr = min(max(_otsu(gray[~black]) if some else 0.0, min_dark_threshold), max_dark_threshold)
    mask = valid & ((sat > s_thr) | (gray < d_thr))
    px_area = float(mpp) ** 2
    # on a small image (a field of view, a 40x crop: the mask is then a few dozen pixels
    # across) a whole patch of tissue can be smaller than min_object_um2; never remove a
    # piece bigger than 0.2 % of the image
    mask = _remove_small(mask, min(min_object_um2 / px_area, 0.002 * mask.size))
    mask = _fill_small_holes(mask, max_hole_um2 / px_area)
    return mask


def mask_read_pixels(source, target_mpp: float = 16.0) -> float:
    """How many slide pixels :func:`tissue_mask` reads for the whole slide (the level it
    reads from, at its size): large only for slides without a usable pyramid."""
    mpp = float(source.mpp)
    H0, W0 = source.shapes[0]
    mask_mpp = min(float(target_mpp), max(mpp, mpp * min(H0, W0) / 32.0))
    lv = source.level_for_mpp(mask_mpp) if hasattr(source, "level_for_mpp") else 0
    d = float(source.downsamples[lv])
    return float(H0) * float(W0) / (d * d)


def tissue_mask(source, target_mpp: float = 16.0, box=None, **kwargs) -> tuple[np.ndarray, float]:
    """``(mask, mask_mpp)``: where the slide holds tissue, on a coarse grid.

    ``mask[i, j]`` covers level-0 pixels ``[i, i + 1) * mask_mpp / source.mpp`` (and the
    same for columns).  ``mask_mpp`` is ``target_mpp``, made finer for images so small
    that the mask would have fewer than 32 pixels across, and never finer than the
    slide itself.  With ``box`` (level-0 x, y, w, h) only that part of the slide is read
    and judged (the rest of the mask is False): a region's cost then does not grow with
    the slide.  Keyword arguments go to :func:`tissue_mask_from_rgb`.
    """
    mpp = float(source.mpp)
    H0, W0 = source.shapes[0]
    mask_mpp = min(float(target_mpp), max(mpp, mpp * min(H0, W0) / 32.0))
    f0 = mask_mpp / mpp
    hf, wf = max(int(H0 // f0), 1), max(int(W0 // f0), 1)
    hc, wc = max(math.ceil(H0 / f0 - 1e-9), 1), max(math.ceil(W0 / f0 - 1e-9), 1)
    thumb = np.zeros((hf, wf, 3), np.uint8)
    unreadable = np.zeros((hf, wf), bool)
    # read in pieces of about 2048 x 2048 pixels of the level read_at_mpp will use
    lv = source.level_for_mpp(mask_mpp) if hasattr(source, "level_for_mpp") else 0
    f_level = f0 / float(source.downsamples[lv])
    step = max(16, int(2048 / max(f_level, 1.0)))
    pieces = [(ty, tx, min(step, hf - ty), min(step, wf - tx)) for ty in range(0, hf, step) for tx in range(0, wf, step)]
    if box is not None:  # only the pieces that meet the box; the rest stays black (never tissue)
        bx, by, bw, bh = box
        my0, my1 = max(0, int(by / f0)), min(hf, math.ceil((by + bh) / f0))
        mx0, mx1 = max(0, int(bx / f0)), min(wf, math.ceil((bx + bw) / f0))
        pieces = [(max(ty, my0), max(tx, mx0), min(ty + th, my1) - max(ty, my0), min(tx + tw, mx1) - max(tx, mx0))
                  for ty, tx, th, tw in pieces]
        pieces = [q for q in pieces if q[2] > 0 and q[3] > 0]
    while pieces:
        ty, tx, th, tw = pieces.pop()
        try:
            thumb[ty : ty + th, tx : tx + tw] = source.read_at_mpp(
                mask_mpp, int(round(ty * f0)), int(round(tx * f0)), th, tw
            )
        except Exception as e:  # noqa: BLE001 - a corrupt tile must not end the run
            if th * tw > 64:  # narrow the damage down: read the piece in quarters
                h2, w2 = max(1, th // 2), max(1, tw // 2)
                pieces += [(ty + a, tx + b, h, w) for a, h in ((0, h2), (h2, th - h2)) for b, w in ((0, w2), (w2, tw - w2))
                           if h > 0 and w > 0]
            else:
                unreadable[ty : ty + th, tx : tx + tw] = True
                log.warning("tissue mask: %s unreadable at level-0 y=%d x=%d (%s); that part counts as tissue, so "
                            "its tiles are run (and marked unknown if they cannot be read)",
                            getattr(source, "path", "slide"), int(ty * f0), int(tx * f0), e)
    if (hc, wc) != (hf, wf):  # the last partial row / column repeats its neighbour
        thumb = np.pad(thumb, ((0, hc - hf), (0, wc - wf), (0, 0)), mode="edge")
        unreadable = np.pad(unreadable, ((0, hc - hf), (0, wc - wf)), mode="edge")
    mask = tissue_mask_from_rgb(thumb, mask_mpp, **kwargs)
    return mask | unreadable, mask_mpp


def tile_has_tissue(
    mask: np.ndarray,
    mask_mpp: float,
    y0: float,
    x0: float,
    h: float,
    w: float,
    level0_mpp: float,
    min_fraction: float = 0.01,
) -> bool:
    """Whether the level-0 box ``(y0, x0, h, w)`` holds at least ``min_fraction`` tissue.

    The fraction is taken over the mask pixels the box touches inside the slide (a
    mask pixel partly covered counts, so the test errs towards running a tile).  A
    box entirely outside the mask has no tissue.
    """
    s = float(level0_mpp) / float(mask_mpp)
    mh, mw = mask.shape
    my0, my1 = max(int(math.floor(y0 * s)), 0), min(int(math.ceil((y0 + h) * s)), mh)
    mx0, mx1 = max(int(math.floor(x0 * s)), 0), min(int(math.ceil((x0 + w) * s)), mw)
    if my0 >= my1 or mx0 >= mx1:
        return False
    frac = float(np.mean(mask[my0:my1, mx0:mx1]))
    return frac > 0 and frac >= min_fraction


def grow(mask: np.ndarray) -> np.ndarray:
    """The mask grown by one of its pixels (16 um on a slide's mask): what the engine
    counts as tissue when it clears glass and when it takes statistics."""
    from scipy import ndimage

    return ndimage.binary_dilation(mask, np.ones((3, 3), bool))


def statistics_mask(rgb: np.ndarray, mpp: float) -> "np.ndarray | None":
    """Where an image of ``mpp`` um per pixel holds tissue, per pixel: the tissue mask
    :func:`tissue_mask` gives for it, grown by one mask pixel, sampled at every pixel's
    centre.  None when that is every pixel (or none).  Training uses it so that the
    network's statistics are taken over the pixels the whole-slide engine takes them
    over (``EngineConfig.tissue_statistics``)."""
    from .image import ImageSlide

    img = np.asarray(rgb)
    if img.dtype != np.uint8:
        img = np.clip(np.rint(np.asarray(img, np.float32) * 255.0), 0, 255).astype(np.uint8)
    h, w = img.shape[:2]
    m, m_mpp = tissue_mask(ImageSlide(img[..., :3], mpp=float(mpp)))
    g = grow(m)
    r = float(mpp) / float(m_mpp)
    iy = np.clip(((np.arange(h) + 0.5) * r).astype(int), 0, g.shape[0] - 1)
    ix = np.clip(((np.arange(w) + 0.5) * r).astype(int), 0, g.shape[1] - 1)
    sm = g[np.ix_(iy, ix)]
    if sm.all() or not sm.any():
        return None
    return sm
