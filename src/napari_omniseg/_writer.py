"""napari writers: tissue Labels layers -> OME-Zarr label store, or QuPath GeoJSON.

The layers must be napari-omniseg tissue layers (made by the Segment widget or read
from a store): their metadata says which tissue they hold, where they lie on the
slide (origin and factor on the tissue's pixel grid) and the slide's level-0 size
and um/px, which the store and the GeoJSON coordinates need.  The complete-map
layer is skipped (it is rebuilt from the tissues).

- ``.ome.zarr``: a :class:`~napari_omniseg.labels.store.LabelStore` (NGFF labels,
  one multiscale image per tissue plus the complete map).  An existing store of the
  same slide and settings is updated in place; anything else at that path is refused.
- ``.geojson``: QuPath annotations in level-0 slide pixels, through
  :func:`napari_omniseg.labels.export.write_geojson`.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np

META_KEY = "omniseg"


class WriterError(ValueError):
    pass


def _collect(layer_data) -> tuple[list, dict]:
    """[(tissue, level-0 array, origin)] and slide info from napari's layer data."""
    from .tissues import UnknownTissueError, get_tissue

    items, slide = [], {}
    seen = set()
    for data, meta, kind in layer_data:
        if kind != "labels":
            continue
        om = (meta.get("metadata") or {}).get(META_KEY)
        name = meta.get("name", "?")
        if isinstance(om, dict) and om.get("kind") in ("map", "store-map"):
            continue
        if not isinstance(om, dict) or "tissue" not in om:
            raise WriterError(
                f"layer {name!r} was not made by napari-omniseg (its metadata does not say which tissue it holds "
                "or where it lies on the slide); save it with napari's own TIFF/NPY writer instead"
            )
        try:
            t = get_tissue(om["tissue"])
        except UnknownTissueError as e:
            raise WriterError(f"layer {name!r}: {e}") from None
        if t.name in seen:
            raise WriterError(f"two layers hold {t.label}; save them one at a time")
        seen.add(t.name)
        shape0 = om.get("level0_shape")
        mpp0 = om.get("level0_mpp")
        if not shape0 or not mpp0:
            raise WriterError(f"layer {name!r} does not record the slide's size and um/px; re-run the segmentation")
        info = {"level0_shape": tuple(int(v) for v in shape0), "level0_mpp": float(mpp0),
                "slide": str(om.get("slide", "")), "model_version": str(om.get("model_version", ""))}
        for k in ("level0_shape", "level0_mpp"):
            if slide and (slide[k] != info[k] if k == "level0_shape" else not math.isclose(slide[k], info[k], rel_tol=1e-3)):
                raise WriterError("the layers belong to different slides; save the layers of one slide at a time")
        slide = slide or info
        arr = np.asarray(data[0] if isinstance(data, (list, tuple)) else data)
        if arr.ndim != 2:
            raise WriterError(f"layer {name!r}: expected 2-D labels, got shape {arr.shape}")
        origin = tuple(int(v) for v in om.get("origin", (0, 0)))
        items.append((t, arr.astype(np.uint8, copy=False), origin))
    if not items:
        raise WriterError("no napari-omniseg tissue layers to save")
    return items, slide


def _write_store(path: Path, items, slide, chunk: int = 256):
    from .labels.store import LabelStore

    tissues = sorted([t for t, _a, _o in items], key=lambda t: t.id)
    attrs = {"source": slide["slide"], "model_version": slide["model_version"], "model_sha256": "",
             "written_by": "napari-omniseg napari writer"}
    store = LabelStore.create(path, tissues, slide["level0_shape"], slide["level0_mpp"], chunk, attrs)
    for t, arr, origin in items:
        dst = store.level(t.name, 0)
        H, W = dst.shape
        y0, x0 = max(0, origin[0]), max(0, origin[1])
        y1, x1 = min(H, origin[0] + arr.shape[0]), min(W, origin[1] + arr.shape[1])
        if y0 < y1 and x0 < x1:
            dst[y0:y1, x0:x1] = arr[y0 - origin[0] : y1 - origin[0], x0 - origin[1] : x1 - origin[1]]
    store.finalize(tissues, run_info={"written_by": "napari writer"})
    return store


def write_labels_zarr(path: str, layer_data: list) -> list[str]:
    """npe2 writer: tissue Labels layers -> an OME-Zarr label store at ``path``."""
    items, slide = _collect(layer_data)
    p = Path(path)
    if not p.name.endswith(".zarr"):
        p = p.with_name(p.name + ".ome.zarr")
    _write_store(p, items, slide)
    return [str(p)]


def write_labels_geojson(path: str, layer_data: list) -> list[str]:
    """npe2 writer: tissue Labels layers -> QuPath GeoJSON (level-0 slide pixel coordinates)."""
    from .labels.export import write_geojson

    items, slide = _collect(layer_data)
    p = Path(path)
    if p.suffix.lower() != ".geojson":
        p = p.with_name(p.name + ".geojson")
    with tempfile.TemporaryDirectory(prefix="omniseg-geojson-") as tmp:
        store = _write_store(Path(tmp) / "labels.ome.zarr", items, slide)
        write_geojson(store, p, tissues=[t.name for t, _a, _o in items])
    return [str(p)]


def write_regions_geojson(path: "str | Path", regions, slide) -> Path:
    """Working regions (:class:`~napari_omniseg.corrections.WorkingRegion`) of one slide
    (:class:`~napari_omniseg.corrections.SlideInfo`) -> QuPath GeoJSON at ``path``."""
    from .labels.export import write_geojson

    items = [(r.tissue, r.data, tuple(r.origin)) for r in regions]
    if not items:
        raise WriterError("no tissue regions to write")
    info = {"level0_shape": tuple(slide.level0_shape), "level0_mpp": float(slide.mpp),
            "slide": slide.path or slide.id, "model_version": regions[0].model_version}
    p = Path(path)
    with tempfile.TemporaryDirectory(prefix="omniseg-geojson-") as tmp:
        store = _write_store(Path(tmp) / "labels.ome.zarr", items, info)
        write_geojson(store, p, tissues=[t.name for t, _a, _o in items])
    return p
