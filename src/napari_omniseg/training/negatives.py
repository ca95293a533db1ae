"""Negatives across magnifications: a labelled structure is background for the heads
that must not fire on it, seen at those heads' own magnification.

A patch is labelled for one tissue at that tissue's magnification, so the anatomy
relations of :mod:`.relations` only inform the tissues of the same magnification.
Yet the registry's exclusions hold at every magnification: an artery labelled at 10x
is no glomerulus, and a glomerulus labelled at 5x is no tubule. Resampled to the
other tissue's magnification (by a factor between 1/2 and 2, so that the structure
stays recognisable), the patch becomes a negative example for that tissue's head:
its labelled pixels are background, every other pixel is unknown (never supervised).

Nothing here names a tissue: which heads get negatives from which patches follows
from :func:`..tissues.exclusive` and the magnifications in the registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..tissues import Tissue, exclusive
from .data import resample_pair
from .relations import UNKNOWN

#: resampling factors outside this range are not used (a 40x capillary shrunk to 5x is
#: a few pixels; a 5x patch blown up 8x is blur)
MIN_FACTOR, MAX_FACTOR = 0.5, 2.0
#: a negative image smaller than this (px) is not used
MIN_SIDE = 96


@dataclass
class Negative:
    """One negative example: ``image`` at ``tissue``'s magnification, ``target`` int8
    (0 where the source's labelled structure lies, -1 elsewhere)."""

    tissue: Tissue
    image: np.ndarray
    target: np.ndarray
    source_tissue: str


def cross_scale_negatives(samples: Sequence, tissues: Sequence[Tissue]) -> list[Negative]:
    """Every (sample, tissue) pair the registry allows: the sample's tissue excludes the
    other tissue, their magnifications differ by a factor within [1/2, 2], and the
    sample has labelled pixels. Samples need ``image``, ``mask`` and ``tissue``."""
    out = []
    for s in samples:
        if s.mask is None or not s.mask.any():
            continue
        for t in tissues:
            if t.magnification == s.tissue.magnification or not exclusive(s.tissue, t):
                continue
            f = t.magnification / s.tissue.magnification
            if not (MIN_FACTOR <= f <= MAX_FACTOR):
                continue
            img, msk = resample_pair(s.image, s.mask, s.tissue.mpp, t.mpp)
            if min(msk.shape) < MIN_SIDE or not msk.any():
                continue
            target = np.where(msk, 0, UNKNOWN).astype(np.int8)
            out.append(Negative(tissue=t, image=img, target=target, source_tissue=s.tissue.name))
    return out


def negative_batches(negs: Sequence[Negative], batch_size: int, per_tissue: int, rng: np.random.Generator) -> list[list[int]]:
    """``per_tissue`` batches of negatives for every tissue that has any, drawn without
    repeats within an epoch while the pool lasts (then reshuffled)."""
    pools: dict[int, list[int]] = {}
    for i, n in enumerate(negs):
        pools.setdefault(n.tissue.id, []).append(i)
    batches = []
    for tid in sorted(pools):
        need = per_tissue * batch_size
        seq: list[int] = []
        while len(seq) < need:
            idx = np.array(pools[tid])
            rng.shuffle(idx)
            seq += idx.tolist()
        batches += [seq[j : j + batch_size] for j in range(0, need, batch_size)]
    return batches


def summary(negs: Sequence[Negative]) -> dict:
    """Counts per (head, source tissue), for provenance and reports."""
    out: dict[str, dict[str, int]] = {}
    for n in negs:
        row = out.setdefault(n.tissue.name, {})
        row[n.source_tissue] = row.get(n.source_tissue, 0) + 1
    return out
