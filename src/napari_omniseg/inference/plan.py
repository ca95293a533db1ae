"""Tiling plans: one grid per magnification, anchored at the slide's origin.

For a magnification with target pixel size ``mpp`` the slide is seen as a grid of
``H x W`` target pixels.  That grid is cut into square *blocks* of ``core`` pixels
(the output chunks).  Tile ``(i, j)`` is the block plus a ``margin`` on every side,
so neighbouring tiles overlap by ``2 * margin`` pixels; in that band their
probabilities are blended with linear ramps that sum to one.  Because the grid is
anchored at the slide's origin and each block depends only on its 3 x 3
neighbouring tiles, a region run computes exactly the tiles a whole-slide run
computes there, and gives the same pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..slides.base import RegionOutsideError
from ..tissues import Tissue, magnification_groups


@dataclass
class MagPlan:
    magnification: int
    mpp: float  #: target microns per pixel
    factor: float  #: level-0 pixels per target pixel
    tissues: list[Tissue]
    shape: tuple[int, int]  #: full target grid (H, W)
    core: int
    margin: int
    blocks: list[tuple[int, int]] = field(default_factory=list)  #: blocks to produce, row-major
    tiles: list[tuple[int, int]] = field(default_factory=list)  #: tiles to run, row-major

    @property
    def tile_size(self) -> int:
        return self.core + 2 * self.margin

    @property
    def n_blocks(self) -> tuple[int, int]:
        return (math.ceil(self.shape[0] / self.core), math.ceil(self.shape[1] / self.core))

    def block_bounds(self, bi: int, bj: int) -> tuple[int, int, int, int]:
        """Target-pixel bounds (y0, y1, x0, x1) of a block, clipped to the grid."""
        c = self.core
        return bi * c, min((bi + 1) * c, self.shape[0]), bj * c, min((bj + 1) * c, self.shape[1])

    def tile_origin(self, ti: int, tj: int) -> tuple[int, int]:
        """Target-pixel (y, x) of a tile's top-left corner (may be negative)."""
        return ti * self.core - self.margin, tj * self.core - self.margin

    def level0_box(self, ti: int, tj: int) -> tuple[int, int, int, int]:
        """Level-0 (y, x, h, w) that tile covers, for tissue-mask tests."""
        y, x = self.tile_origin(ti, tj)
        s = self.tile_size
        return (int(round(y * self.factor)), int(round(x * self.factor)),
                int(round(s * self.factor)), int(round(s * self.factor)))


def ramp_window(core: int, margin: int) -> np.ndarray:
    """2-D blending weights of a tile: 1 in the middle, linear ramps over the 2*margin bands.

    The ramps of two neighbouring tiles add up to exactly 1 at every pixel they share.
    """
    s = core + 2 * margin
    w = np.ones(s, np.float32)
    if margin > 0:
        p = np.arange(2 * margin, dtype=np.float32)
        up = (p + 0.5) / (2 * margin)
        w[: 2 * margin] = up
        w[s - 2 * margin :] = up[::-1]
    return np.outer(w, w)


def make_plans(
    tissues: Sequence[Tissue],
    level0_shape: tuple[int, int],
    level0_mpp: float,
    region: tuple[int, int, int, int] | None = None,
    core: int = 512,
    margin: int = 32,
) -> list[MagPlan]:
    """One plan per magnification among ``tissues``.

    ``region`` is level-0 ``(x, y, w, h)``; ``None`` means the whole slide.
    """
    H0, W0 = level0_shape
    if region is not None:
        x, y, w, h = region
        if w <= 0 or h <= 0:
            raise RegionOutsideError(f"region {region} is empty (width and height must be > 0)")
        if x < 0 or y < 0 or x + w > W0 or y + h > H0:
            raise RegionOutsideError(f"region x={x} y={y} w={w} h={h} is outside the slide (level 0 is {W0} x {H0} px)")
    plans = []
    for mag, group in magnification_groups(tissues).items():
        mpp = group[0].mpp
        f = mpp / level0_mpp
        shape = (max(1, math.ceil(H0 / f)), max(1, math.ceil(W0 / f)))
        p = MagPlan(mag, mpp, f, list(group), shape, core, margin)
        nby, nbx = p.n_blocks
        if region is None:
            by0, by1, bx0, bx1 = 0, nby, 0, nbx
        else:
            ty0, tx0 = int(y / f), int(x / f)
            ty1, tx1 = math.ceil((y + h) / f), math.ceil((x + w) / f)
            by0, by1 = ty0 // core, min(nby, math.ceil(ty1 / core))
            bx0, bx1 = tx0 // core, min(nbx, math.ceil(tx1 / core))
        p.blocks = [(i, j) for i in range(by0, by1) for j in range(bx0, bx1)]
        tiles = {(i + di, j + dj) for i, j in p.blocks for di in (-1, 0, 1) for dj in (-1, 0, 1)}
        p.tiles = sorted(t for t in tiles if 0 <= t[0] < nby and 0 <= t[1] < nbx)
        plans.append(p)
    return plans


def region_in_plan(plan: MagPlan, region: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """Target-pixel bounds (y0, y1, x0, x1) of a level-0 region in a plan's grid."""
    x, y, w, h = region
    f = plan.factor
    return int(y / f), min(plan.shape[0], math.ceil((y + h) / f)), int(x / f), min(plan.shape[1], math.ceil((x + w) / f))
