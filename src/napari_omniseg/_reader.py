"""napari readers: whole-slide images, and napari-omniseg segmentation stores.

- Slides (``.svs .tif .tiff .ome.tif .ndpi .mrxs`` files, OME-Zarr image folders)
  become one RGB image layer: a lazy dask pyramid (largest level first) in square
  tiles, scaled in microns (``scale = (mpp, mpp)``, ``units = micrometer``), with
  the slide's path and pixel size in ``metadata`` so the widgets re-read tiles at
  native resolution.  A file without a pixel size opens at 1 unit per pixel; the
  Segment widget then asks for the um/px.
- A segmentation store (``*.ome.zarr`` written by napari-omniseg) becomes one
  multiscale Labels layer per tissue plus the complete map, each in its colours and
  placed in microns over the slide (pixel-centre convention: a tissue pixel covers
  ``f`` level-0 pixels, ``f = mpp_tissue / mpp_level0``).

``get_*_reader`` never raise: they return ``None`` for paths they do not handle, so
napari can offer another reader.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".ome.tif", ".ome.tiff", ".tif", ".tiff")
_VENDOR = (".svs", ".ndpi", ".mrxs", ".scn")


def _single(path):
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    return str(path)


# --------------------------------------------------------------------------- slides
def get_slide_reader(path):
    """Reader for slide files; ``None`` for plain TIFFs that carry neither a pyramid nor a
    pixel size (napari's own reader shows those just as well)."""
    p = _single(path)
    if p is None or not p.lower().endswith(SLIDE_SUFFIXES) or not Path(p).is_file():
        return None
    if p.lower().endswith(_VENDOR) or p.lower().endswith((".ome.tif", ".ome.tiff")):
        return read_slide
    try:
        from .slides import open_slide

        with open_slide(p, require_mpp=False) as src:
            if src.levels > 1 or src.file_mpp is not None or (src.metadata or {}).get("tile"):
                return read_slide
    except Exception as e:  # noqa: BLE001 - a reader lookup must not raise
        log.debug("not a slide: %s (%s)", p, e)
    return None


def read_slide(path) -> list:
    """Layer data for a slide: ``[(levels, kwargs, "image")]``."""
    from .slides import open_slide

    p = _single(path)
    src = open_slide(p, require_mpp=False)
    levels = [src.dask_level(k) for k in range(src.levels)]
    mpp = src.mpp if src.mpp_source else None
    scale = (mpp, mpp) if mpp else (1.0, 1.0)
    meta = {"path": str(Path(p).resolve()), "mpp": mpp, "level0_shape": list(src.shapes[0]),
            "format": getattr(src, "format", ""), "slide_metadata": {k: v for k, v in (src.metadata or {}).items()
                                                                     if isinstance(v, (str, int, float, bool))}}
    kw = {
        "name": Path(p).name,
        "rgb": True,
        "multiscale": len(levels) > 1,
        "scale": scale,
        "units": ("micrometer", "micrometer") if mpp else ("pixel", "pixel"),
        "axis_labels": ("y", "x"),
        "metadata": meta,
    }
    return [(levels if len(levels) > 1 else levels[0], kw, "image")]


# --------------------------------------------------------------------------- zarr folders
def _is_omniseg_store(p: Path) -> bool:
    import json

    zj = p / "zarr.json"
    if not zj.exists():
        return False
    try:
        attrs = json.loads(zj.read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False
    from .labels.store import STORE_FORMAT

    return attrs.get("omniseg", {}).get("format") == STORE_FORMAT


def get_zarr_reader(path):
    """Reader for ``*.zarr`` folders: our segmentation stores, else OME-Zarr slides."""
    p = _single(path)
    if p is None:
        return None
    pp = Path(p)
    if not pp.is_dir():
        return None
    try:
        if _is_omniseg_store(pp):
            return read_label_store
        from .slides import open_slide

        with open_slide(pp, require_mpp=False):
            return read_slide
    except Exception as e:  # noqa: BLE001
        log.debug("not a readable zarr: %s (%s)", p, e)
    return None


def store_layer_data(store) -> list:
    """One multiscale Labels layer per tissue of a :class:`LabelStore`, then the complete map."""
    from ._widgets._layers import META_KEY, map_color_dict, tissue_color_dict
    from .labels.store import MAP_NAME
    from .tissues import TISSUES, UnknownTissueError, get_tissue

    meta = store.meta
    mpp0 = float(meta["level0_mpp"])
    names = [n for n in store.label_names() if store.has(n)]
    tissues = []
    for n in store.tissue_names:
        try:
            tissues.append(get_tissue(n))
        except UnknownTissueError:
            pass
    out = []
    for n in names:
        levels = store.dask_levels(n)
        mpp = store.mpp(n)
        f = mpp / mpp0
        if n == MAP_NAME:
            name, cmap = "tissue map", map_color_dict(tissues or TISSUES)
        else:
            try:
                t = get_tissue(n)
                name, cmap = t.short_label, tissue_color_dict(t)
            except UnknownTissueError:
                name, cmap = n, {0: "transparent", 1: "white", 255: (0.5, 0.5, 0.5, 0.6), None: "transparent"}
        kw = {
            "name": name,
            "multiscale": len(levels) > 1,
            "scale": (mpp, mpp),
            "translate": (mpp0 * (f - 1) / 2, mpp0 * (f - 1) / 2),
            "units": ("micrometer", "micrometer"),
            "colormap": cmap,
            "opacity": 0.5,
            "metadata": {META_KEY: {"kind": "store" if n != MAP_NAME else "store-map", "tissue": n,
                                    "store": str(store.path), "mpp": mpp, "factor": f, "level0_mpp": mpp0,
                                    "level0_shape": list(meta.get("level0_shape", [])),
                                    "model_version": meta.get("model_version", ""),
                                    "complete": bool(meta.get("complete"))}},
        }
        out.append((levels if len(levels) > 1 else levels[0], kw, "labels"))
    return out


def read_label_store(path) -> list:
    from .labels.store import LabelStore

    p = _single(path)
    store = LabelStore(p)
    if not store.complete:
        log.warning("%s is incomplete (a run was interrupted); rerun it to finish", p)
    return store_layer_data(store)
