"""Export a label store as QuPath GeoJSON and as a per-tissue measurements CSV.

Vectorisation
-------------
:func:`mask_to_polygons` turns a binary mask into one geometry per 8-connected
object, traced exactly on the pixel edges: pixel ``(i, j)`` covers
``[j, j + 1) x [i, i + 1)`` in ``(x, y)``, so every vertex lies on an integer
grid point and a polygon's area equals the object's pixel count exactly (before
scaling).  How it is done:

1. objects are found with :func:`skimage.measure.label` (8-connectivity);
2. for each object, its own mask (cropped to its bounding box, padded by one
   background pixel so every contour closes) goes through
   :func:`skimage.measure.find_contours` at level 0.5.  On a 0/1 image the contour
   points are exactly the midpoints of the pixel edges between the object and the
   background; between two consecutive midpoints lies the grid corner shared by
   their edges, ``floor((p + q) / 2)`` in edge coordinates, so the pixel-edge
   outline is recovered exactly (collinear corners are then dropped);
3. where an 8-connected object touches itself only at a corner (a "saddle"), an
   outline passes that corner twice; such rings are split there into simple loops;
4. every pixel is inside an odd number of its object's loops and every other point
   inside an even number (loops are boundaries of the object, nested or side by
   side, touching at most at corners), so the object is the symmetric difference of
   its loops' interiors.  This is exact on the integer grid and gives valid
   geometries with holes, including islands inside holes and holes touching the
   outline at a corner, without depending on contour orientation conventions.

An object that is a single polygon comes back as a :class:`shapely.Polygon`.  An
object whose pixels are joined only at a corner (two pixels touching diagonally)
cannot be one *valid* polygon in the OGC sense (a ring may not touch itself), so it
comes back as a :class:`shapely.MultiPolygon` whose parts touch at that corner --
still one geometry, one GeoJSON feature and one counted object.  Exteriors are
counter-clockwise and holes clockwise (shapely's sign convention: positive shoelace
area; in y-down image coordinates this looks mirrored, which QuPath does not mind).

GeoJSON for QuPath
------------------
:func:`labels_to_geojson` writes one ``annotation`` feature per object, classified by
tissue (its human label and the colour stored in the label store), in **level-0
slide pixel** coordinates: a tissue's level-``k`` label pixel ``i`` covers slide
pixels ``[i * s, (i + 1) * s)`` with ``s = f * 2**k`` and
``f = mpp(tissue) / level0_mpp``, so coordinates are ``x_slide = x_edge * s`` (no
offset: pixel edges map onto slide pixel edges).  The last label row/column may
reach past the slide's edge (label grids are rounded up), so geometries are clipped
to the slide's extent.  Unknown pixels (255, tiles that could not be read) are not
tissue and are never exported as polygons.

Which pyramid level is vectorised: the finest one with at most ``max_pixels``
pixels (64 M by default).  Tissues at 40x on a large slide have label images of
several gigapixels; those are vectorised from a coarser level of the pyramid, which
is the finer level subsampled by 2 per step, so objects smaller than that level's
pixel may be missed and outlines are coarser.  Pass ``level=`` to force a level.

Measurements
------------
:func:`measurements` counts objects (8-connected) and areas on the same level the
GeoJSON would use, with the pixel area ``(mpp * 2**k)**2`` um^2; densities are per
mm^2 of tissue area, taken from the argument, else from the store's metadata key
``tissue_area_mm2``, else the whole slide area; the ``density_basis`` column says
which (``argument``, ``store``, ``slide``).
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import uuid
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import shapely
from scipy import ndimage
from shapely.geometry import MultiPolygon, Polygon, box
from shapely.geometry.polygon import orient
from skimage.measure import find_contours, label

from .._io import atomic_write_bytes
from ..tissues import TISSUES, Tissue, UnknownTissueError, get_tissue
from .aggregate import UNKNOWN
from .store import LabelStore

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "MEASUREMENT_COLUMNS",
    "choose_level",
    "mask_to_polygons",
    "labels_to_geojson",
    "write_geojson",
    "measurements",
    "write_measurements_csv",
]

#: largest label image (pixels) vectorised or measured when no level is given
DEFAULT_MAX_PIXELS = 64_000_000

#: columns of the measurements CSV, in order
MEASUREMENT_COLUMNS = (
    "tissue",
    "objects",
    "area_um2",
    "mean_object_area_um2",
    "density_per_mm2",
    "density_basis",
    "tissue_area_mm2",
    "unknown_area_um2",
    "level",
    "pixel_size_um",
)


# ---------------------------------------------------------------------- polygons
def _split_at_repeats(ring: np.ndarray) -> list[np.ndarray]:
    """Split an open ring of integer corners that revisits a corner into simple loops."""
    keys = ring[:, 0] * (int(ring[:, 1].max()) + 2) + ring[:, 1]
    if len(np.unique(keys)) == len(keys):
        return [ring]
    loops: list[np.ndarray] = []
    path: list[int] = []
    where: dict[int, int] = {}  # key -> position in path
    for i, k in enumerate(keys.tolist()):
        if k in where:  # close the loop that started at the earlier visit
            start = where[k]
            loop = path[start:]
            for j in loop[1:]:
                del where[int(keys[j])]
            del path[start + 1 :]
            if len(loop) >= 3:
                loops.append(ring[loop])
        else:
            where[k] = len(path)
            path.append(i)
    if len(path) >= 3:
        loops.append(ring[path])
    return loops


def _drop_collinear(ring: np.ndarray) -> np.ndarray:
    """Remove corners where an axis-aligned outline goes straight on."""
    prev = ring - np.roll(ring, 1, axis=0)
    nxt = np.roll(ring, -1, axis=0) - ring
    cross = prev[:, 0] * nxt[:, 1] - prev[:, 1] * nxt[:, 0]
    return ring[cross != 0]


def _object_loops(sub: np.ndarray) -> list[np.ndarray]:
    """Simple pixel-edge loops (x, y integer corners, open) of one object's cropped mask."""
    padded = np.pad(sub, 1).astype(np.float32)
    loops = []
    for c in find_contours(padded, 0.5, fully_connected="high"):
        c = np.round(c * 2.0) / 2.0  # midpoints of pixel edges, exactly
        if len(c) < 3:
            continue
        if not np.array_equal(c[0], c[-1]):  # cannot happen on a padded mask
            c = np.vstack([c, c[:1]])
        corners = np.floor((c[:-1] + c[1:]) / 2.0).astype(np.int64)  # (row, col) edge coords
        keep = np.any(corners != np.roll(corners, 1, axis=0), axis=1)
        corners = corners[keep][:, ::-1]  # -> (x, y)
        for loop in _split_at_repeats(corners):
            loop = _drop_collinear(loop)
            if len(loop) >= 3:
                loops.append(loop)
    return loops


def _polygons_of(geom) -> list[Polygon]:
    if geom.is_empty:
        return []
    if isinstance(geom, Polygon):
        return [geom]
    if isinstance(geom, MultiPolygon):
        return list(geom.geoms)
    if hasattr(geom, "geoms"):  # a GeometryCollection: keep its areas only
        return [p for g in geom.geoms for p in _polygons_of(g)]
    return []


def _tidy(geom):
    """Valid, oriented (exterior CCW, holes CW) Polygon or MultiPolygon, or None if empty."""
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
    polys = [orient(p, sign=1.0) for p in _polygons_of(geom) if p.area > 0]
    if not polys:
        return None
    return polys[0] if len(polys) == 1 else MultiPolygon(polys)


def mask_to_polygons(
    mask: np.ndarray,
    scale: float = 1.0,
    offset: Sequence[float] = (0.0, 0.0),
    min_area_px: int = 0,
) -> list:
    """Vectorise a 2-D boolean mask: one geometry per 8-connected object, with holes.

    Outlines run on pixel edges (pixel ``(i, j)`` covers ``[j, j+1) x [i, i+1)``);
    output coordinates are ``x_out = x * scale + offset[0]``,
    ``y_out = y * scale + offset[1]``.  Objects with fewer than ``min_area_px``
    pixels are dropped.  Returns, in raster order of the objects' labels, a
    :class:`shapely.Polygon` per object, or a :class:`shapely.MultiPolygon` for an
    object whose parts touch only at a corner (see the module docstring).  All
    geometries are valid; exteriors are counter-clockwise, holes clockwise.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    mask = mask.astype(bool, copy=False)
    if not mask.any():
        return []
    lab, n = label(mask, connectivity=2, return_num=True)
    counts = np.bincount(lab.ravel(), minlength=n + 1)
    ox, oy = float(offset[0]), float(offset[1])
    out = []
    for i, sl in enumerate(ndimage.find_objects(lab), start=1):
        if sl is None or counts[i] < min_area_px:
            continue
        sub = lab[sl] == i
        loops = _object_loops(sub)
        shift = np.array([sl[1].start, sl[0].start])
        polys = [Polygon(loop + shift) for loop in loops]
        geom = functools.reduce(shapely.symmetric_difference, polys)
        if scale != 1.0 or ox or oy:
            geom = shapely.transform(geom, lambda xy: xy * scale + np.array([ox, oy]))
        geom = _tidy(geom)
        if geom is not None:
            out.append(geom)
    return out


# ---------------------------------------------------------------------- store helpers
def _open(store_or_path) -> LabelStore:
    return store_or_path if isinstance(store_or_path, LabelStore) else LabelStore(store_or_path)


def _store_color(store: LabelStore, name: str) -> tuple[int, int, int] | None:
    try:
        colors = store.root["labels"][name].attrs["ome"]["image-label"]["colors"]
    except KeyError:
        return None
    for c in colors:
        if c.get("label-value") == 1:
            return tuple(int(v) for v in c["rgba"][:3])
    return None


def _resolve(store: LabelStore, tissues) -> list[tuple[str, str, tuple[int, int, int]]]:
    """(store name, display label, rgb) for the requested tissues (None: all in the store)."""
    names = store.tissue_names
    registry = {t.name: t for t in TISSUES}
    out = []
    for key in (names if not tissues else tissues):
        given = key if isinstance(key, Tissue) else None
        if given is not None:
            name = given.name
        elif str(key) in names:
            name = str(key)
        else:
            try:
                name = get_tissue(key).name
            except UnknownTissueError:
                name = str(key)
        if name not in names:
            raise KeyError(f"tissue {key!r} is not in {store.path}; it holds: {', '.join(names)}")
        t = given or registry.get(name)
        lab = (t.label if t is not None else None) or name
        rgb = _store_color(store, name) or (t.rgb if t is not None else (255, 255, 255))
        if name not in [o[0] for o in out]:
            out.append((name, lab, rgb))
    return out


def choose_level(store_or_path, name: str, max_pixels: int = DEFAULT_MAX_PIXELS, level: int | None = None) -> int:
    """The pyramid level of tissue ``name`` to vectorise or measure.

    ``level`` if given (checked), else the finest level with at most ``max_pixels``
    pixels, else the coarsest level.
    """
    store = _open(store_or_path)
    nl = store.n_levels(name)
    if level is not None:
        if not 0 <= level < nl:
            raise ValueError(f"level {level} out of range for {name!r} (0..{nl - 1})")
        return int(level)
    for k in range(nl):
        shape = store.level(name, k).shape
        if shape[0] * shape[1] <= max_pixels:
            return k
    return nl - 1


def _scale(store: LabelStore, name: str, k: int) -> float:
    """Level-0 slide pixels per label pixel of ``name`` at level ``k``."""
    return store.mpp(name) / float(store.meta["level0_mpp"]) * 2**k


def _ring(coords) -> list[list[float]]:
    return [[float(x), float(y)] for x, y in coords]


def _geometry_json(geom) -> dict:
    def poly(p: Polygon):
        return [_ring(p.exterior.coords)] + [_ring(r.coords) for r in p.interiors]

    if isinstance(geom, Polygon):
        return {"type": "Polygon", "coordinates": poly(geom)}
    return {"type": "MultiPolygon", "coordinates": [poly(p) for p in geom.geoms]}


# ---------------------------------------------------------------------- GeoJSON
def labels_to_geojson(
    store_or_path,
    tissues: "Iterable[str | Tissue] | None" = None,
    level: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict:
    """A QuPath-readable GeoJSON FeatureCollection of the store's objects.

    One ``annotation`` feature per 8-connected object of each tissue, polygons with
    holes in level-0 slide pixel coordinates (see the module docstring), classified
    ``{"name": tissue label, "color": [r, g, b]}``, with the object's area in um^2
    under ``measurements``.  ``tissues`` limits the export (names, codes or aliases);
    ``level``/``max_pixels`` choose the pyramid level (see :func:`choose_level`).
    """
    store = _open(store_or_path)
    meta = store.meta
    l0_mpp = float(meta["level0_mpp"])
    h0, w0 = (int(v) for v in meta["level0_shape"])
    slide = box(0, 0, w0, h0)
    features = []
    for name, lab, rgb in _resolve(store, tissues):
        k = choose_level(store, name, max_pixels, level)
        mask = np.asarray(store.level(name, k)[...]) == 1  # 255 (unknown) is not tissue
        for geom in mask_to_polygons(mask, scale=_scale(store, name, k)):
            minx, miny, maxx, maxy = geom.bounds
            if minx < 0 or miny < 0 or maxx > w0 or maxy > h0:
                geom = _tidy(geom.intersection(slide))
                if geom is None:
                    continue
            features.append({
                "type": "Feature",
                "id": str(uuid.uuid4()),
                "geometry": _geometry_json(geom),
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": lab, "color": [int(c) for c in rgb]},
                    "isLocked": False,
                    "measurements": {"area_um2": float(geom.area * l0_mpp**2)},
                },
            })
    return {"type": "FeatureCollection", "features": features}


def write_geojson(store_or_path, out_path: "str | Path", **kwargs) -> Path:
    """Write :func:`labels_to_geojson` to ``out_path`` atomically; returns the path."""
    fc = labels_to_geojson(store_or_path, **kwargs)
    out = Path(out_path)
    atomic_write_bytes(out, json.dumps(fc).encode("utf-8"))
    return out


# ---------------------------------------------------------------------- measurements
def measurements(
    store_or_path,
    tissue_area_mm2: float | None = None,
    tissues: "Iterable[str | Tissue] | None" = None,
    level: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[dict]:
    """Per-tissue object counts, areas and densities (one dict per tissue).

    Keys are :data:`MEASUREMENT_COLUMNS`: ``objects`` (8-connected objects),
    ``area_um2`` (foreground pixels x pixel area), ``mean_object_area_um2`` (0.0 when
    there are no objects), ``density_per_mm2`` (objects per mm^2 of tissue area),
    ``density_basis`` and ``tissue_area_mm2`` (the area used: ``argument``,
    ``store`` metadata ``tissue_area_mm2``, or the whole ``slide``),
    ``unknown_area_um2`` (pixels marked unknown), ``level`` and ``pixel_size_um`` (the
    pyramid level measured and its pixel size).
    """
    store = _open(store_or_path)
    meta = store.meta
    if tissue_area_mm2 is not None:
        area_mm2, basis = float(tissue_area_mm2), "argument"
    elif meta.get("tissue_area_mm2") is not None:
        area_mm2, basis = float(meta["tissue_area_mm2"]), "store"
    else:
        h0, w0 = meta["level0_shape"]
        area_mm2, basis = float(h0) * float(w0) * float(meta["level0_mpp"]) ** 2 / 1e6, "slide"
    if not area_mm2 > 0:
        raise ValueError(f"tissue area must be positive, got {area_mm2} mm^2 ({basis})")
    rows = []
    for name, _lab, _rgb in _resolve(store, tissues):
        k = choose_level(store, name, max_pixels, level)
        arr = np.asarray(store.level(name, k)[...])
        rows.append(measure_mask(name, arr, store.mpp(name) * 2**k, area_mm2, basis, level=k))
    return rows


def measure_mask(name: str, arr: np.ndarray, px_um: float, area_mm2: float, basis: str, level: int = 0) -> dict:
    """One measurements row (:data:`MEASUREMENT_COLUMNS`) of a tissue's 0/1/unknown grid
    with square pixels of ``px_um`` microns; the density is objects per ``area_mm2``."""
    fg = arr == 1
    n = int(label(fg, connectivity=2, return_num=True)[1]) if fg.any() else 0
    area = float(np.count_nonzero(fg)) * px_um**2
    return {
        "tissue": name,
        "objects": n,
        "area_um2": area,
        "mean_object_area_um2": area / n if n else 0.0,
        "density_per_mm2": n / area_mm2 if area_mm2 > 0 else 0.0,
        "density_basis": basis,
        "tissue_area_mm2": area_mm2,
        "unknown_area_um2": float(np.count_nonzero(arr == UNKNOWN)) * px_um**2,
        "level": level,
        "pixel_size_um": px_um,
    }


def measurements_csv(rows: Sequence[dict]) -> str:
    """Measurement rows as CSV text (columns :data:`MEASUREMENT_COLUMNS`, floats exact)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(MEASUREMENT_COLUMNS), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (repr(v) if isinstance(v, float) and math.isfinite(v) else v) for k, v in r.items()})
    return buf.getvalue()


def write_measurements_csv(store_or_path, out_path: "str | Path", **kwargs) -> Path:
    """Write :func:`measurements` as CSV (columns :data:`MEASUREMENT_COLUMNS`) atomically."""
    out = Path(out_path)
    atomic_write_bytes(out, measurements_csv(measurements(store_or_path, **kwargs)).encode("utf-8"))
    return out
