"""Where to review first: per-block uncertainty scores and the ranked review queue (Qt-free).

While it segments, the engine scores every output block of every tissue from the
probabilities it has anyway (no second pass over the slide):

- ``entropy``: mean binary entropy of the tissue's pixel probabilities, in bits
  (0 = every pixel certain, 1 = every pixel on the decision threshold);
- ``uncertain``: the share of pixels with a probability between 0.25 and 0.75;

Pixels of glass that the engine clears (white and outside the tissue mask) count as
certain background for both, since the labels there are background whatever the head
said. Both are taken relative to the tissue's decision threshold ``th`` (the checkpoint's
calibrated one, 0.5 by default): the probability is first mapped piecewise
linearly so that ``th`` lands on 0.5 (0 -> 0, th -> 0.5, 1 -> 1).
- ``violation``: the share of the tissue's predicted pixels that break the tissue
  registry's anatomy at that magnification: a tissue predicted outside the tissue
  it lies inside (tuft outside its glomerular unit), a container missing where its
  inner tissue is predicted, or two tissues that exclude each other predicted on
  one pixel;
- ``foreground``: the share of pixels predicted as the tissue.

They are stored in the label store as one small float32 array per tissue,
``review/<tissue>`` (one cell per block, NaN where a block was not run), see
docs/formats.md.

The queue ranks blocks by ``score = entropy + violation`` (both in 0..1) and takes
the tissues in turn (``balance``, the default): the most uncertain block of each
tissue, tissues ordered by that block's score, then the second of each, and so on,
so that one tissue whose head is unsure everywhere cannot fill the queue. It
spreads them out: a block is skipped when its centre lies within ``spread`` block
widths (default 2) of a block already in the queue, for any tissue, so ten
neighbouring blocks of one artefact take one place, not ten.
Blocks covered (over half their area) by a region already committed in the
correction project leave the queue.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np

from ..tissues import TISSUES, Tissue, contains, exclusive, get_tissue

FIELDS = ("entropy", "uncertain", "violation", "foreground")
GROUP = "review"


def calibrated(p: np.ndarray, th: float) -> np.ndarray:
    """Map probabilities so that the decision threshold ``th`` lands on 0.5."""
    if th == 0.5:
        return p
    p = np.asarray(p)
    a, b = p.dtype.type(0.5 / th), p.dtype.type(0.5 / (1.0 - th))
    return np.where(p < th, p * a, 0.5 + (p - th) * b).astype(p.dtype, copy=False)


def block_scores(prob: np.ndarray, labels: dict[str, np.ndarray], tissues: Sequence[Tissue],
                 unknown: np.ndarray | None = None, thresholds: "dict | None" = None) -> dict[str, np.ndarray]:
    """Scores (:data:`FIELDS`) of one block: ``prob`` is (K, h, w) for ``tissues`` in
    order, ``labels`` their 0/1 decisions (cut at ``thresholds``, tissue name ->
    threshold, 0.5 if absent); pixels in ``unknown`` are left out."""
    keep = np.ones(prob.shape[1:], bool) if unknown is None else ~unknown
    n = int(keep.sum())
    out = {}
    fg = {t.name: (labels[t.name] == 1) & keep for t in tissues}
    for k, t in enumerate(tissues):
        if n == 0:
            out[t.name] = np.full(len(FIELDS), np.nan, np.float32)
            continue
        # float32 throughout: the scores rank blocks, and this runs once per block and tissue
        pk = prob[k] if n == keep.size else prob[k][keep]
        p = calibrated(np.asarray(pk, np.float32), float((thresholds or {}).get(t.name, 0.5)))
        p = np.clip(p, np.float32(1e-6), np.float32(1 - 1e-6))
        q = 1 - p
        ent = float(-(np.dot(p.ravel(), np.log2(p).ravel()) + np.dot(q.ravel(), np.log2(q).ravel())) / p.size)
        unc = float(np.count_nonzero((p > 0.25) & (p < 0.75)) / p.size)
        mine = fg[t.name]
        n_fg = int(mine.sum())
        bad = np.zeros_like(mine)
        for o in tissues:
            if o.name == t.name:
                continue
            if contains(o, t):  # t lies inside o: t outside o is wrong
                bad |= mine & ~fg[o.name]
            elif contains(t, o):  # o lies inside t: o where t is missing is wrong (counted on o's pixels)
                bad |= fg[o.name] & ~mine
            elif exclusive(t, o):
                bad |= mine & fg[o.name]
        denom = max(n_fg, int(bad.sum()), 1)
        out[t.name] = np.array([ent, unc, float(bad.sum()) / denom if bad.any() else 0.0, n_fg / n], np.float32)
    return out


@dataclass
class Suggestion:
    """One place to review: a block of one tissue, as a level-0 box (x, y, w, h)."""

    rank: int
    tissue: str
    x: int
    y: int
    w: int
    h: int
    score: float
    entropy: float
    uncertain: float
    violation: float
    foreground: float

    @property
    def box(self) -> tuple[int, int, int, int]:
        return (self.x, self.y, self.w, self.h)

    @property
    def key(self) -> str:
        return f"{self.tissue}:{self.x}:{self.y}:{self.w}:{self.h}"

    def why(self) -> str:
        from ..tissues import get_tissue as _gt

        parts = [f"uncertainty {self.entropy:.2f} bits"]
        if self.violation > 0:
            parts.append(f"{self.violation:.0%} of its pixels break the anatomy rules")
        parts.append(f"{self.foreground:.0%} predicted {_gt(self.tissue).short_label.lower()}")
        return f"#{self.rank} {_gt(self.tissue).short_label}: score {self.score:.2f} (" + ", ".join(parts) + ")"

    def to_json(self) -> dict:
        return asdict(self)


def _overlap(a, b) -> float:
    """Share of box ``a``'s area covered by box ``b`` (both x, y, w, h)."""
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    iw = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    ih = max(0, min(ay + ah, by + bh) - max(ay, by))
    return iw * ih / max(1, aw * ah)


def suggest(store, tissues: "Iterable[str | Tissue] | None" = None, n: int = 20, *,
            reviewed: "Iterable[tuple[str, tuple[int, int, int, int]]]" = (), spread: float = 2.0,
            balance: bool = True, registry: Sequence[Tissue] = TISSUES) -> list[Suggestion]:
    """The review queue of a label store: up to ``n`` blocks, most uncertain first.

    ``reviewed`` lists (tissue, level-0 box) pairs already corrected (a block of that
    tissue covered over half by such a box leaves the queue).  Stores written before
    scores existed have no ``review`` group: the queue is then empty.
    """
    from .store import LabelStore

    st = store if isinstance(store, LabelStore) else LabelStore(store)
    if GROUP not in st.root:
        return []
    grp = st.root[GROUP]
    names = [get_tissue(t, registry).name for t in tissues] if tissues else [n_ for n_ in st.tissue_names if n_ in grp]
    reviewed = [(get_tissue(t, registry).name, tuple(b)) for t, b in reviewed]
    H0, W0 = st.meta["level0_shape"]
    cands = []
    for name in names:
        if name not in grp:
            continue
        arr = grp[name]
        core = int(arr.attrs["core"])
        f = float(arr.attrs["factor"])
        a = np.asarray(arr[...])
        score = a[..., 0] + a[..., 2]
        for bi, bj in zip(*np.nonzero(np.isfinite(score))):
            x, y = int(round(bj * core * f)), int(round(bi * core * f))
            w, h = min(int(round(core * f)), W0 - x), min(int(round(core * f)), H0 - y)
            if w <= 0 or h <= 0:
                continue
            box = (x, y, w, h)
            if any(t == name and _overlap(box, b) > 0.5 for t, b in reviewed):
                continue
            cands.append((float(score[bi, bj]), name, box, a[bi, bj], core * f))
    cands.sort(key=lambda c: (-c[0], c[1], c[2][1], c[2][0]))
    if balance:  # tissues in turn: each one's k-th block before any tissue's (k+1)-th
        nth: dict = {}
        order = []
        for c in cands:
            order.append((nth.get(c[1], 0), c))
            nth[c[1]] = nth.get(c[1], 0) + 1
        cands = [c for _k, c in sorted(order, key=lambda kc: kc[0])]  # stable: score order within a turn
    out: list[Suggestion] = []
    centres: list[tuple[float, float, float]] = []
    for s, name, (x, y, w, h), v, size in cands:
        cx, cy = x + w / 2, y + h / 2
        if any(math.hypot(cx - ox, cy - oy) < spread * max(size, osz) for ox, oy, osz in centres):
            continue
        centres.append((cx, cy, size))
        out.append(Suggestion(len(out) + 1, name, x, y, w, h, s, *[float(u) for u in v]))
        if len(out) >= n:
            break
    return out


def suggestions_geojson(sugs: Sequence[Suggestion]) -> dict:
    """The queue as QuPath GeoJSON annotations (level-0 pixels), named by rank and score."""
    feats = []
    for s in sugs:
        t = get_tissue(s.tissue)
        x0, y0, x1, y1 = s.x, s.y, s.x + s.w, s.y + s.h
        feats.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
            "properties": {"objectType": "annotation", "name": f"review #{s.rank} {t.short_label} ({s.score:.2f})",
                           "classification": {"name": f"Review: {t.label}", "color": list(t.rgb)},
                           "omniseg_review": s.to_json()},
        })
    return {"type": "FeatureCollection", "features": feats}
