"""Dice + binary cross-entropy on the 2-logit output, with the boundary ring weight.

The target has two channels (background, foreground).  Pixels in a ring up to two
pixels (4-connected steps) outside each object get weight 1.2, everything else 1.0,
so the network is pushed to separate touching objects.  The weight enters the BCE
and the Dice sums (intersection and both denominators), so Dice stays within [0, 1].
Loss = mean over both channels of (1 - Dice) + mean weighted BCE, 1:1.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

RING_WEIGHT = 1.2
RING_WIDTH = 2


def ring_weight(mask: np.ndarray, weight: float = RING_WEIGHT, width: int = RING_WIDTH) -> np.ndarray:
    """Weight map: ``weight`` on the ring just outside objects, 1 elsewhere."""
    if not mask.any():
        return np.ones(mask.shape, np.float32)
    ring = ndi.binary_dilation(mask, iterations=width) & ~mask
    return np.where(ring, np.float32(weight), np.float32(1.0))


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None, smooth: float = 1.0) -> torch.Tensor:
    """logits N x 2 x H x W; target N x H x W (0/1, or -1 where unknown: left out of both
    terms); weight N x H x W or None."""
    known = None
    if target.dtype != torch.bool and bool((target < 0).any()):
        known = (target >= 0).float().unsqueeze(1)
        target = target.clamp(min=0)
    t = torch.stack([1.0 - target.float(), target.float()], dim=1)
    w = torch.ones_like(t[:, :1]) if weight is None else weight.float().unsqueeze(1)
    if known is not None:
        w = w * known
    p = torch.sigmoid(logits.float())
    dims = (2, 3)
    inter = (p * t * w).sum(dims)
    denom = (p * w).sum(dims) + (t * w).sum(dims)
    dice = (2 * inter + smooth) / (denom + smooth)
    if known is None:
        bce = F.binary_cross_entropy_with_logits(logits.float(), t, weight=w.expand_as(t), reduction="mean")
    else:  # the mean over the known pixels, as the mean over all of them when every pixel is known
        bce = (F.binary_cross_entropy_with_logits(logits.float(), t, weight=w.expand_as(t), reduction="sum")
               / (2 * known.sum()).clamp(min=1))
    return (1.0 - dice).mean() + bce


def partial_label_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor | None = None,
    primary: int = 0,
    derived_weight: float = 0.5,
    smooth: float = 1.0,
) -> torch.Tensor:
    """Loss over several tissue heads where only some pixels are known.

    ``logits`` N x T x 2 x H x W (one head per column), ``targets`` N x T x H x W with
    1 foreground, 0 background, -1 unknown (never supervised), ``weights`` N x T x H x W
    (the boundary ring) or None.  Each head is scored on the logit difference
    ``l1 - l0``, the same quantity the foreground decision uses: weighted binary
    cross-entropy averaged over its known pixels, plus (1 - soft Dice of the
    foreground) summed over the whole batch's known pixels when the batch holds any
    of its foreground.  A batch-wide Dice does not reward an empty prediction on a
    crop that happens to miss the object, as a per-image Dice does.  Column
    ``primary`` (the tissue the images were labelled for) has weight 1, every other
    column ``derived_weight``; columns with no known pixel add nothing.
    """
    d = (logits[:, :, 1] - logits[:, :, 0]).float()
    t = targets.float()
    known = (targets >= 0).float()
    w = known if weights is None else known * weights.float()
    tpos = t.clamp(min=0)
    total = d.new_zeros(())
    norm = 0.0
    for j in range(d.shape[1]):
        kj = known[:, j].sum()
        if float(kj) == 0:
            continue
        bce = F.binary_cross_entropy_with_logits(d[:, j], tpos[:, j], weight=w[:, j], reduction="sum") / w[:, j].sum()
        term = bce
        pos = (tpos[:, j] * known[:, j]).sum()
        if float(pos) > 0:
            p = torch.sigmoid(d[:, j]) * known[:, j]
            inter = (p * tpos[:, j]).sum()
            dice = (2 * inter + smooth) / (p.sum() + pos + smooth)
            term = term + (1.0 - dice)
        wt = 1.0 if j == primary else derived_weight
        total = total + wt * term
        norm += wt
    return total / max(norm, 1e-8)
