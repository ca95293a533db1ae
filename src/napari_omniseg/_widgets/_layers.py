"""Label layers for tissues: colours, placement over the slide, update in place (no Qt)."""

from __future__ import annotations

import numpy as np

from ..tissues import TISSUES, Tissue

META_KEY = "omniseg"
UNKNOWN_RGBA = (0.5, 0.5, 0.5, 0.6)
MAP_LAYER = "tissue map"


def tissue_color_dict(t: Tissue) -> dict:
    """{0: transparent, 1: tissue colour, 255: grey} for napari's DirectLabelColormap."""
    return {0: "transparent", 1: t.color, 255: UNKNOWN_RGBA, None: "transparent"}


def map_color_dict(tissues=TISSUES) -> dict:
    d = {0: "transparent", 255: UNKNOWN_RGBA, None: "transparent"}
    for t in tissues:
        d[t.id + 1] = t.color
    return d


def colormap(color_dict: dict):
    from napari.utils.colormaps import DirectLabelColormap

    return DirectLabelColormap(color_dict=color_dict)


def compose(image_layer, scale0, translate0):
    """Level-0 pixel (scale, translate) -> world (scale, translate) of ``image_layer``."""
    s = np.asarray(image_layer.scale[-2:], float)
    t = np.asarray(image_layer.translate[-2:], float)
    return tuple(np.asarray(scale0, float) * s), tuple(np.asarray(translate0, float) * s + t)


def image_extent_level0(image_layer) -> tuple[int, int]:
    d = image_layer.data[0] if image_layer.multiscale else image_layer.data
    return int(d.shape[0]), int(d.shape[1])


def world_to_level0(image_layer, yx_world) -> np.ndarray:
    """World (y, x) -> level-0 pixel (y, x) of the image layer (scale and translate only)."""
    s = np.asarray(image_layer.scale[-2:], float)
    t = np.asarray(image_layer.translate[-2:], float)
    return (np.asarray(yx_world, float) - t) / s


def find_tissue_layer(viewer, tissue_name: str, image_layer=None):
    """Our labels layer of ``tissue_name`` (made for ``image_layer`` when given)."""
    for lyr in viewer.layers:
        md = getattr(lyr, "metadata", {}) or {}
        om = md.get(META_KEY)
        if lyr.__class__.__name__ == "Labels" and isinstance(om, dict) and om.get("tissue") == tissue_name \
                and om.get("kind") == "working":
            if image_layer is None or om.get("image") == image_layer.name:
                return lyr
    return None


def find_map_layer(viewer, image_layer=None):
    for lyr in viewer.layers:
        om = (getattr(lyr, "metadata", {}) or {}).get(META_KEY)
        if isinstance(om, dict) and om.get("kind") == "map":
            if image_layer is None or om.get("image") == image_layer.name:
                return lyr
    return None


def show_region(viewer, image_layer, wr, meta: dict):
    """Add or update the editable labels layer of a working region; returns the layer.

    The layer shares ``wr.data`` (no copy), so painting edits the session's array.
    """
    t = wr.tissue
    scale, translate = compose(image_layer, *wr.napari_transform())
    om = {"kind": "working", "tissue": t.name, "image": image_layer.name, "origin": list(wr.origin),
          "factor": wr.factor, "mpp": wr.mpp, "model_version": wr.model_version, **meta}
    lyr = find_tissue_layer(viewer, t.name, image_layer)
    if lyr is None:
        lyr = viewer.add_labels(wr.data, name=t.short_label, scale=scale, translate=translate, opacity=0.5,
                                colormap=colormap(tissue_color_dict(t)), metadata={META_KEY: om},
                                units=image_layer.units[-2:])
    else:
        lyr.metadata = {**lyr.metadata, META_KEY: om}
        lyr.scale = scale
        lyr.translate = translate
        lyr.data = wr.data
    lyr.selected_label = 1  # painting adds tissue; 0 erases
    outline_container(lyr, t)
    return lyr


#: outline width (screen pixels) of a tissue that holds another one
CONTOUR_PX = 2


def outline_container(layer, tissue) -> None:
    """Draw a tissue that holds another (the glomerular unit holds the tuft) as its
    outline, so the inner tissue's fill stays visible inside it.  The layer's Contour
    control in napari turns it back into a fill (0)."""
    from ..tissues import TISSUES, encloses_another

    if encloses_another(tissue, TISSUES):
        layer.contour = CONTOUR_PX


def resample_nearest(data: np.ndarray, src_factor: float, src_origin, dst_factor: float, dst_origin, dst_shape):
    """Nearest-neighbour resampling of a tissue grid onto another grid (both anchored at level 0)."""
    r = dst_factor / src_factor
    ys = np.floor((np.arange(dst_shape[0]) + dst_origin[0] + 0.5) * r).astype(int) - src_origin[0]
    xs = np.floor((np.arange(dst_shape[1]) + dst_origin[1] + 0.5) * r).astype(int) - src_origin[1]
    ys = np.clip(ys, 0, data.shape[0] - 1)
    xs = np.clip(xs, 0, data.shape[1] - 1)
    return data[np.ix_(ys, xs)]


def complete_map_of(regions: dict, tissues) -> tuple[np.ndarray, float, tuple[int, int]]:
    """The complete label map of working regions, on the finest grid among them."""
    from ..labels.aggregate import complete_map

    finest = min(regions.values(), key=lambda r: r.factor)
    masks = {name: resample_nearest(r.data, r.factor, r.origin, finest.factor, finest.origin, finest.data.shape)
             for name, r in regions.items()}
    return complete_map(masks, [t for t in tissues if t.name in masks]), finest.factor, finest.origin
