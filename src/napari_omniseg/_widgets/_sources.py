"""Slide sources for napari image layers (no Qt here).

A layer opened by our reader carries the slide's path in ``metadata["path"]`` and
is re-opened with :func:`napari_omniseg.slides.open_slide`, so tiles are read at
native resolution without going through napari.  Any other image layer (a plain
numpy or dask array, or a multiscale list of them) is wrapped in
:class:`ArraySource`, which implements the same interface as the slide readers.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from ..slides.base import SlideSource, level_downsample


class SourceError(ValueError):
    """The image cannot be segmented as it is; the message says why and what to do."""


def _to_uint8_rgb(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 2:
        a = a[..., None]
    if a.dtype != np.uint8:
        if a.dtype == bool:
            a = a.astype(np.uint8) * 255
        elif np.issubdtype(a.dtype, np.floating):
            hi = float(np.nanmax(a)) if a.size else 1.0
            a = np.clip(np.nan_to_num(a) * (255.0 if hi <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        elif a.dtype == np.uint16:
            a = (a >> 8).astype(np.uint8)
        else:
            a = np.clip(a, 0, 255).astype(np.uint8)
    c = a.shape[2]
    if c == 1:
        a = np.repeat(a, 3, axis=2)
    elif c == 2:
        a = np.repeat(a[..., :1], 3, axis=2)
    elif c > 3:
        a = a[..., :3]
    return np.ascontiguousarray(a)


class ArraySource(SlideSource):
    """An in-memory (numpy or dask) image, optionally a pyramid (largest first), as a slide.

    Reads, resampling (``read_at_mpp``), lazy levels and the edge rules are those of
    :class:`napari_omniseg.slides.base.SlideSource`; this class only supplies pixels,
    converting greyscale, RGBA, 16-bit and float images to 8-bit RGB tile by tile.
    """

    def __init__(self, levels, mpp: float, name: str = "image"):
        if not isinstance(levels, (list, tuple)):
            levels = [levels]
        if not levels:
            raise SourceError(f"{name}: empty image")
        for a in levels:
            if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 2, 3, 4)):
                raise SourceError(
                    f"{name}: expected a 2-D greyscale or RGB(A) image (H x W or H x W x 3), got shape {tuple(a.shape)}"
                )
        try:
            v = float(mpp)
        except (TypeError, ValueError):
            v = float("nan")
        if not (v > 0 and math.isfinite(v)):
            raise SourceError(f"{name}: unknown pixel size; give the image's microns per pixel (um/px)")
        self._arrays = list(levels)
        self.path = Path(name)
        self.name = name
        self.format = "array"
        self.metadata = {}
        self.shapes = [tuple(int(n) for n in a.shape[:2]) for a in self._arrays]
        self.downsamples = [level_downsample(self.shapes[0], s) for s in self.shapes]
        self.file_mpp = None
        self._finish_init(v)

    def _read(self, level, y0, y1, x0, x1):
        return _to_uint8_rgb(np.asarray(self._arrays[level][y0:y1, x0:x1]))


def layer_level0(layer):
    """Level-0 array of an image layer (multiscale or not)."""
    return layer.data[0] if getattr(layer, "multiscale", False) else layer.data


def layer_mpp(layer, override: float | None = None) -> float | None:
    """Microns per pixel of a layer's level 0: the user's value, our reader's metadata,
    or the layer's scale when its units are microns."""
    if override:
        return float(override)
    md = getattr(layer, "metadata", {}) or {}
    if md.get("mpp"):
        return float(md["mpp"])
    try:
        units = [str(u) for u in layer.units][-2:]
    except Exception:
        units = []
    if units and all(u in ("micrometer", "micron", "um", "µm") for u in units):
        s = [float(v) for v in layer.scale[-2:]]
        if math.isclose(s[0], s[1], rel_tol=1e-3):
            return s[0]
    return None


def open_layer_source(layer, mpp_override: float | None = None):
    """A slide source for ``layer``; raises :class:`SourceError` with a clear message."""
    md = getattr(layer, "metadata", {}) or {}
    path = md.get("path")
    if path:
        from ..slides import MissingMppError, SlideError, open_slide

        try:
            return open_slide(path, mpp=float(mpp_override) if mpp_override else None)
        except MissingMppError:
            raise SourceError(f"{path}: the file does not record its pixel size; enter the microns per pixel "
                              "(um/px) in the widget (0.25 for a 40x scan, 0.5 for 20x)") from None
        except SlideError as e:
            raise SourceError(str(e)) from None
    mpp = layer_mpp(layer, mpp_override)
    if mpp is None:
        raise SourceError(
            f"layer {layer.name!r} has no pixel size (um/px): enter it in the widget, "
            "or open the slide with the napari-omniseg reader"
        )
    levels: Sequence = list(layer.data) if getattr(layer, "multiscale", False) else [layer.data]
    if getattr(layer, "rgb", True) is False and levels[0].ndim == 3:
        raise SourceError(f"layer {layer.name!r} is not an RGB image (shape {tuple(levels[0].shape)}); "
                          "segmentation needs a 2-D RGB or greyscale image")
    return ArraySource(levels, mpp, name=layer.name)
