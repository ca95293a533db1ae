"""Per-tissue decision thresholds, calibrated on labelled patches.

A head trained from partial labels is often under-confident for a tissue it saw
little of: its probabilities rank the pixels well but sit below 0.5 on much of the
tissue (the soft Dice term and the many background pixels pull them down). Cutting
each tissue's probability map at its own threshold, the one that gives the best
mean Dice on labelled patches, recovers that tissue without touching the weights.

The thresholds are stored in the checkpoint's sidecar (``thresholds``) and used by
every path that turns probabilities into labels (the whole-slide engine, patch
evaluation, the demo). Training calibrates them on its own training and validation
patches; a tissue with fewer than ``min_samples`` patches that show it keeps its
previous threshold (or 0.5).

Optionally (``negatives=True``; ``omniseg calibrate --count-negatives``) the cut also
pays for firing where the tissue cannot be: the labelled patches of tissues the
registry says exclude it, resampled to its magnification (the negatives of
:mod:`.negatives`). Each cut then scores its mean Dice minus the mean share of those
excluded structures' pixels it marks, so a head that is under-confident on its own
tissue is not cut so low that it marks tubules or arteries as well.

Only patches whose annotation contains the tissue vote. A patch annotated as empty
(an exported correction where the pathologist erased the tissue) scores Dice 1 for
any cut high enough to mark nothing, so a few of them outvote the patches that
show the tissue and push its threshold to the top of the grid: measured on a
widget fine-tune whose 4 artery patches held 3 empty ones, the artery threshold
went 0.05 -> 0.90 and the artery vanished from every unseen patch.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .data import Sample, load_arrays
from .metrics import dice

#: candidate thresholds, coarse on purpose: a handful of patches per tissue cannot
#: tell 0.31 from 0.33
GRID: tuple[float, ...] = tuple(round(0.05 * k, 2) for k in range(1, 19))  # 0.05 .. 0.90


def probability_maps(ckpt, samples: Sequence[Sample], batch_size: int = 8, device="cpu") -> list[np.ndarray]:
    """Foreground probability of each sample's own tissue (full patches), float32."""
    import torch

    from ..model.network import fg_probability
    from .loop import _device, _pad_to, _stat_masks

    samples = [s if s.image is not None else load_arrays([s])[0] for s in samples]
    dev = _device(device) if isinstance(device, str) else device
    model = ckpt.model.to(dev).eval()
    out: list = [None] * len(samples)
    by_shape: dict[tuple, list[int]] = {}
    for i, s in enumerate(samples):
        by_shape.setdefault(s.image.shape, []).append(i)
    with torch.inference_mode():
        for idxs in by_shape.values():
            for j in range(0, len(idxs), batch_size):
                chunk = idxs[j : j + batch_size]
                x = torch.from_numpy(np.stack([samples[i].image for i in chunk])).permute(0, 3, 1, 2).to(dev)
                sm = _stat_masks(x.float() / 255.0, [samples[i].tissue.mpp for i in chunk], model)
                x, crop = _pad_to(ckpt.normalize(x), ckpt.model.cfg.divisor)
                sm = None if sm is None else _pad_to(sm.to(dev), ckpt.model.cfg.divisor)[0]
                feats = model.features(x, sm)
                tids = torch.tensor([[samples[i].tissue.id] for i in chunk], device=dev)
                p = fg_probability(model.heads(feats, tids)[:, 0].float())
                p = p[..., : crop[0], : crop[1]].cpu().numpy()
                for k, i in enumerate(chunk):
                    out[i] = p[k]
    return out


def threshold_table(probs: Sequence[np.ndarray], samples: Sequence[Sample], grid: Sequence[float] = GRID) -> dict:
    """tissue name -> {threshold: mean Dice over that tissue's samples whose annotation
    contains it} (patches annotated empty do not vote; see the module docstring)."""
    acc: dict = {}
    for p, s in zip(probs, samples):
        gt = np.asarray(s.mask) > 0
        if not gt.any():
            continue
        row = acc.setdefault(s.tissue.name, {th: [] for th in grid})
        for th in grid:
            row[th].append(dice(p > th, gt))
    return {t: {th: float(np.mean(v)) for th, v in row.items()} for t, row in acc.items()}


def negative_table(ckpt, negatives: Sequence, grid: Sequence[float] = GRID, device="cpu") -> dict:
    """tissue name -> {threshold: mean over its negatives of the share of the excluded
    structure's pixels the head marks at that cut}."""
    import torch

    from ..model.network import fg_probability
    from .loop import _device, _pad_to, _stat_masks

    dev = _device(device) if isinstance(device, str) else device
    model = ckpt.model.to(dev).eval()
    acc: dict = {}
    with torch.inference_mode():
        for n in negatives:
            h, w = n.target.shape
            x = torch.from_numpy(np.ascontiguousarray(n.image)[None]).permute(0, 3, 1, 2).to(dev)
            sm = _stat_masks(x.float() / 255.0, [n.tissue.mpp], model)
            x, _ = _pad_to(ckpt.normalize(x), ckpt.model.cfg.divisor)
            sm = None if sm is None else _pad_to(sm.to(dev), ckpt.model.cfg.divisor)[0]
            p = fg_probability(model.heads(model.features(x, sm), [n.tissue.id])[:, 0].float())[0, :h, :w].cpu().numpy()
            q = p[n.target == 0]
            if q.size == 0:
                continue
            row = acc.setdefault(n.tissue.name, {th: [] for th in grid})
            for th in grid:
                row[th].append(float((q > th).mean()))
    return {t: {th: float(np.mean(v)) for th, v in row.items()} for t, row in acc.items()}


def penalised_table(table: dict, neg: dict) -> dict:
    """Dice minus the share of excluded structures marked, per tissue and cut (tissues
    without negatives keep their Dice)."""
    return {t: {th: d - neg.get(t, {}).get(th, 0.0) for th, d in row.items()} for t, row in table.items()}


def calibration_counts(samples: Sequence[Sample]) -> dict:
    """tissue name -> number of patches whose annotation contains that tissue (the
    patches that vote in :func:`threshold_table`)."""
    counts: dict = {}
    for s in samples:
        if np.asarray(s.mask).any():
            counts[s.tissue.name] = counts.get(s.tissue.name, 0) + 1
    return counts


def pick_thresholds(table: dict, counts: dict, min_samples: int = 4, previous: dict | None = None) -> dict:
    """The best threshold per tissue (ties within 0.005 Dice go to the one nearest 0.5);
    tissues with fewer than ``min_samples`` patches keep ``previous`` (or are left out)."""
    out = dict(previous or {})
    for name, row in table.items():
        if counts.get(name, 0) < min_samples:
            continue
        best = max(row.values())
        near = [th for th, d in row.items() if d >= best - 0.005]
        out[name] = float(min(near, key=lambda th: (abs(th - 0.5), th)))
    return out


def calibrate_thresholds(ckpt, samples: Sequence[Sample], *, min_samples: int = 4, grid: Sequence[float] = GRID,
                         device="cpu", negatives: bool = False) -> tuple[dict, dict]:
    """Thresholds for ``ckpt`` from labelled ``samples``: (thresholds, per-tissue table).

    With ``negatives`` the cuts also pay for marking other tissues' labelled structures
    (module docstring); the table is then the penalised score."""
    samples = [s if s.image is not None else load_arrays([s])[0] for s in samples]
    probs = probability_maps(ckpt, samples, device=device)
    table = threshold_table(probs, samples, grid)
    if negatives:
        from ..tissues import with_registry_relations
        from .negatives import cross_scale_negatives

        negs = cross_scale_negatives(samples, with_registry_relations(ckpt.tissues))
        table = penalised_table(table, negative_table(ckpt, negs, grid, device=device))
    return pick_thresholds(table, calibration_counts(samples), min_samples, ckpt.thresholds), table
