"""From per-tissue masks to one complete label map.

Tissues are segmented separately (each at its magnification) and may overlap, so
each has its own label image.  The complete map gives every pixel one value:

- ``0`` background, ``tissue.id + 1`` for a tissue, ``255`` unknown (a tile could
  not be read and no tissue was found there);
- a tissue that lies *inside* another (registry field ``inside``; the glomerular
  tuft inside the glomerular unit) is drawn over its container;
- any other pixel claimed by two or more tissues is background, the rule of the
  Omni-Seg paper: the model is not sure which tissue it is, so it claims neither.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ..tissues import Tissue

UNKNOWN = 255


def complete_map(masks: Mapping[str, np.ndarray], tissues: Sequence[Tissue]) -> np.ndarray:
    """Combine per-tissue label arrays (0/1/255, same shape) into one uint8 map."""
    present = [t for t in tissues if t.name in masks]
    if not present:
        raise ValueError("no tissue masks given")
    shape = next(iter(masks.values())).shape
    out = np.zeros(shape, np.uint8)
    claims = np.zeros(shape, np.uint8)
    unknown = np.zeros(shape, bool)
    names = {t.name for t in present}
    # containers first, so a contained tissue can be drawn over them
    inner = {t.name for t in present if t.inside in names}
    fg = {t.name: masks[t.name] == 1 for t in present}
    for t in present:
        unknown |= masks[t.name] == UNKNOWN
    for t in present:
        if t.name in inner:
            continue
        m = fg[t.name]
        claims += m
        out[m] = t.id + 1
    out[claims > 1] = 0
    for t in present:
        if t.name in inner:
            # drawn inside its container wherever it is found (the container
            # may itself have lost a collision there; the inner tissue still wins)
            out[fg[t.name]] = t.id + 1
    out[unknown & (out == 0)] = UNKNOWN
    return out
