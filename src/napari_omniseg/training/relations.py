"""Anatomy-aware partial labels: one labelled mask supervises the other tissues too.

A training image carries a mask for one tissue; the other tissues in it are
unlabelled.  The tissue registry (:mod:`..tissues`) knows two relations, and each
turns the one mask into certain knowledge about other tissues *at the same
magnification* (the image is only seen at that magnification, so tissues of other
magnifications get nothing):

- containment (``inner.inside == outer``, the tuft inside the glomerular unit):
  a labelled ``inner`` pixel is ``outer`` foreground; where a labelled ``outer``
  mask is background, ``inner`` is background;
- exclusion (``exclusive(a, b)``, distinct structures such as the distal and the
  proximal tubule): a labelled ``a`` pixel is ``b`` background.

Everything else stays unknown and is not supervised.  Crops that are exactly the
same pixels (one source crop labelled under two tissue folders) merge: every
tissue that one of them labels is known everywhere in all of them.

Targets are int8 maps: 1 foreground, 0 background, -1 unknown (:data:`UNKNOWN`).
No tissue pair is named in this module: adding a tissue with its own relations to
the registry needs no change here.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

from ..tissues import Tissue, contains, exclusive

UNKNOWN = -1


def derived_target(labelled: Tissue, mask: np.ndarray, other: Tissue) -> np.ndarray | None:
    """What a mask of ``labelled`` says about ``other`` (int8, -1/0/1), or None if nothing."""
    if other.name == labelled.name:
        return np.where(mask, 1, 0).astype(np.int8)
    if other.magnification != labelled.magnification:
        return None
    t = np.full(mask.shape, UNKNOWN, np.int8)
    said = False
    if contains(other, labelled):  # labelled lies inside other: its pixels are other's foreground
        t[mask] = 1
        said = True
    if contains(labelled, other):  # other lies inside labelled: outside labelled is not other
        t[~mask] = 0
        said = True
    if exclusive(labelled, other):
        t[mask] = 0
        said = True
    return t if said else None


def combine(targets: Sequence[np.ndarray]) -> np.ndarray:
    """Several derived targets for one tissue: agreement is kept, contradiction is unknown."""
    out = np.full(targets[0].shape, UNKNOWN, np.int8)
    pos = np.zeros(out.shape, bool)
    neg = np.zeros(out.shape, bool)
    for t in targets:
        pos |= t == 1
        neg |= t == 0
    out[pos & ~neg] = 1
    out[neg & ~pos] = 0
    return out


def _pixels_key(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes() + str(image.shape).encode()).hexdigest()


def build_targets(samples: Sequence, tissues: Sequence[Tissue]) -> list[dict[int, np.ndarray]]:
    """For each sample (with ``image``, ``mask`` and ``tissue``), the targets of every tissue it informs.

    Returns one dict per sample: tissue id -> int8 target (H x W).  The sample's own
    tissue is always present.  Samples with identical pixels at the same
    magnification share their labels: a tissue labelled directly by any of them is
    taken as given (direct labels win over derived ones); the others combine all
    derived targets.
    """
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault((s.tissue.magnification, _pixels_key(s.image)), []).append(i)
    out: list[dict[int, np.ndarray]] = [dict() for _ in samples]
    for idxs in groups.values():
        direct: dict[int, np.ndarray] = {}
        for i in idxs:
            s = samples[i]
            if s.tissue.id in direct:  # the same tissue labelled twice on the same pixels: union
                direct[s.tissue.id] = np.maximum(direct[s.tissue.id], s.mask.astype(np.int8))
            else:
                direct[s.tissue.id] = np.where(s.mask, 1, 0).astype(np.int8)
        by_id = {samples[i].tissue.id: samples[i].tissue for i in idxs}
        targets: dict[int, np.ndarray] = dict(direct)
        for other in tissues:
            if other.id in direct:
                continue
            derived = []
            for tid, d in direct.items():
                t = derived_target(by_id[tid], d > 0, other)
                if t is not None:
                    derived.append(t)
            if derived:
                t = combine(derived)
                if (t != UNKNOWN).any():
                    targets[other.id] = t
        for i in idxs:
            out[i] = {k: v.copy() for k, v in targets.items()}
    return out


def relation_summary(samples: Sequence, targets: Sequence[dict[int, np.ndarray]]) -> dict:
    """Counts for reports: samples, merged crops, and supervised pixels per tissue (direct + derived)."""
    per: dict[str, dict[str, int]] = {}
    merged = 0
    for s, tg in zip(samples, targets):
        for tid, t in tg.items():
            name = next((x.tissue.name for x in samples if x.tissue.id == tid), str(tid))
            row = per.setdefault(name, {"direct_px": 0, "derived_px": 0})
            key = "direct_px" if tid == s.tissue.id else "derived_px"
            row[key] += int((t != UNKNOWN).sum())
        if any(tid != s.tissue.id and (t != UNKNOWN).all() for tid, t in tg.items()):
            merged += 1
    return {"samples": len(samples), "merged_with_a_full_label": merged, "per_tissue": per}
