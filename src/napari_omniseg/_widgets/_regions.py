"""Which level-0 region the user means: the field of view or a drawn rectangle (no Qt)."""

from __future__ import annotations

import math

import numpy as np

from ._layers import image_extent_level0, world_to_level0


class RegionError(ValueError):
    pass


def _clip_box(image_layer, lo, hi) -> tuple[int, int, int, int]:
    H, W = image_extent_level0(image_layer)
    # napari pixel centres sit on integers: pixel j covers [j - 0.5, j + 0.5)
    y0 = max(0, int(math.floor(min(lo[0], hi[0]) + 0.5)))
    x0 = max(0, int(math.floor(min(lo[1], hi[1]) + 0.5)))
    y1 = min(H, int(math.ceil(max(lo[0], hi[0]) + 0.5)))
    x1 = min(W, int(math.ceil(max(lo[1], hi[1]) + 0.5)))
    if y1 - y0 < 1 or x1 - x0 < 1:
        raise RegionError("the region does not overlap the image")
    return x0, y0, x1 - x0, y1 - y0


def camera(viewer):
    """The viewer's camera (``viewer.scene.camera`` since napari 0.9, ``viewer.camera`` before)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


def fov_region(viewer, image_layer) -> tuple[int, int, int, int]:
    """Level-0 (x, y, w, h) of the part of the image visible in the canvas."""
    cam = camera(viewer)
    c = np.asarray(cam.center[-2:], float)
    h, w = viewer.canvas.size
    zoom = float(cam.zoom) or 1.0
    half = np.array([h, w], float) / (2 * zoom)
    lo = world_to_level0(image_layer, c - half)
    hi = world_to_level0(image_layer, c + half)
    try:
        return _clip_box(image_layer, lo, hi)
    except RegionError:
        raise RegionError("the field of view does not show the image; pan or zoom to the tissue first") from None


def rect_region(shapes_layer, image_layer) -> tuple[int, int, int, int]:
    """Level-0 (x, y, w, h) of the selected (else the last) shape's bounding box."""
    if shapes_layer is None or len(shapes_layer.data) == 0:
        raise RegionError("draw a rectangle first (Shapes layer, rectangle tool)")
    sel = sorted(shapes_layer.selected_data)
    idx = sel[-1] if sel else len(shapes_layer.data) - 1
    verts = np.asarray(shapes_layer.data[idx], float)[:, -2:]
    world = np.array([np.asarray(shapes_layer.data_to_world(v), float)[-2:] for v in verts])
    pts = world_to_level0(image_layer, world)
    try:
        return _clip_box(image_layer, pts.min(axis=0), pts.max(axis=0))
    except RegionError:
        raise RegionError("the rectangle does not overlap the image") from None


def whole_region(image_layer) -> tuple[int, int, int, int]:
    H, W = image_extent_level0(image_layer)
    return 0, 0, W, H
