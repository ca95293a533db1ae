"""GeoJSON and measurements export: exact outlines, areas and counts on hand-drawn stores."""

from __future__ import annotations

import csv
import json
import uuid

import jsonschema
import numpy as np
import pytest
import shapely
from shapely.geometry import MultiPolygon, Polygon
from skimage.measure import label

from napari_omniseg.labels.export import (
    MEASUREMENT_COLUMNS,
    choose_level,
    labels_to_geojson,
    mask_to_polygons,
    measurements,
    write_geojson,
    write_measurements_csv,
)
from napari_omniseg.labels.store import LabelStore
from napari_omniseg.tissues import get_tissue

# ---------------------------------------------------------------------- the QuPath GeoJSON subset
_NUM = {"type": "number"}
_POINT = {"type": "array", "items": _NUM, "minItems": 2, "maxItems": 2}
_RING = {"type": "array", "items": _POINT, "minItems": 4}
_POLY = {"type": "array", "items": _RING, "minItems": 1}
QUPATH_SCHEMA = {
    "type": "object",
    "required": ["type", "features"],
    "properties": {
        "type": {"const": "FeatureCollection"},
        "features": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["type", "geometry", "properties"],
                "properties": {
                    "type": {"const": "Feature"},
                    "id": {"type": "string"},
                    "geometry": {
                        "oneOf": [
                            {"type": "object", "required": ["type", "coordinates"],
                             "properties": {"type": {"const": "Polygon"}, "coordinates": _POLY}},
                            {"type": "object", "required": ["type", "coordinates"],
                             "properties": {"type": {"const": "MultiPolygon"},
                                            "coordinates": {"type": "array", "items": _POLY, "minItems": 1}}},
                        ]
                    },
                    "properties": {
                        "type": "object",
                        "required": ["objectType", "classification"],
                        "properties": {
                            "objectType": {"type": "string"},
                            "classification": {
                                "type": "object",
                                "required": ["name", "color"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "color": {"type": "array", "minItems": 3, "maxItems": 3,
                                              "items": {"type": "integer", "minimum": 0, "maximum": 255}},
                                },
                            },
                            "isLocked": {"type": "boolean"},
                            "measurements": {"type": "object", "additionalProperties": _NUM},
                        },
                    },
                },
            },
        },
    },
}


def _rings(geometry: dict):
    polys = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
    return [ring for poly in polys for ring in poly]


def _to_shape(geometry: dict):
    return shapely.geometry.shape(geometry)


# ---------------------------------------------------------------------- a hand-drawn store
L0_MPP = 0.5
L0_SHAPE = (250, 254)  # slide pixels (h, w); 5x grids (f = 4) overhang it by half a pixel
GU, TUFT, PT, ART = "glomerular_unit", "glomerular_tuft", "proximal_tubule", "artery"


def _make_store(path, attrs=None) -> LabelStore:
    tissues = [get_tissue(n) for n in (GU, TUFT, PT, ART)]
    st = LabelStore.create(path, tissues, L0_SHAPE, L0_MPP, chunk=32, attrs=attrs or {})
    gu = np.zeros(st.level(GU, 0).shape, np.uint8)  # 63 x 64 at 2 um/px, f = 4
    gu[4:14, 4:14] = 1  # 10x10 square ...
    gu[7:11, 7:11] = 0  # ... with a 4x4 hole: 84 px
    gu[20:22, 20:22] = 1  # two 2x2 squares touching at a corner: one object, 8 px
    gu[22:24, 22:24] = 1
    gu[40:45, 0:10] = 255  # unknown: 50 px
    st.level(GU, 0)[...] = gu
    tuft = np.zeros(st.level(TUFT, 0).shape, np.uint8)
    tuft[61:63, 62:64] = 1  # bottom-right corner, reaches past the slide's edge
    st.level(TUFT, 0)[...] = tuft
    pt = np.zeros(st.level(PT, 0).shape, np.uint8)  # 125 x 127 at 1 um/px, f = 2
    pt[10:13, 10:13] = 1  # two separate squares: 9 + 25 px
    pt[10:15, 30:35] = 1
    st.level(PT, 0)[...] = pt
    st.finalize(tissues)
    return st


@pytest.fixture
def store(tmp_path):
    return _make_store(tmp_path / "s.ome.zarr")


# ---------------------------------------------------------------------- mask_to_polygons
def test_square_with_hole_is_one_polygon_on_pixel_edges():
    m = np.zeros((16, 16), bool)
    m[2:12, 3:13] = True
    m[5:9, 6:10] = False
    (p,) = mask_to_polygons(m)
    assert isinstance(p, Polygon) and p.is_valid
    assert p.area == 84
    assert len(p.interiors) == 1
    assert set(p.exterior.coords) == {(3, 2), (13, 2), (13, 12), (3, 12)}
    assert set(p.interiors[0].coords) == {(6, 5), (10, 5), (10, 9), (6, 9)}
    assert p.exterior.is_ccw and not p.interiors[0].is_ccw
    # scale and offset: x_out = x * scale + offset_x
    (q,) = mask_to_polygons(m, scale=2.5, offset=(100.0, -7.0))
    assert q.bounds == (3 * 2.5 + 100, 2 * 2.5 - 7, 13 * 2.5 + 100, 12 * 2.5 - 7)
    assert q.area == pytest.approx(84 * 2.5**2)
    assert q.exterior.is_ccw and not q.interiors[0].is_ccw


def test_separate_and_diagonal_objects_and_min_area():
    m = np.zeros((12, 12), bool)
    m[1:4, 1:4] = True  # 9 px
    m[1:3, 6:8] = True  # 4 px, separate
    m[7:9, 7:9] = True  # 2x2 ...
    m[9:11, 9:11] = True  # ... touching it diagonally: one 8 px object
    geoms = mask_to_polygons(m)
    assert [g.area for g in geoms] == [9, 4, 8]
    diag = geoms[2]
    assert isinstance(diag, MultiPolygon) and diag.is_valid and len(diag.geoms) == 2
    assert diag.geoms[0].touches(diag.geoms[1])
    assert [g.area for g in mask_to_polygons(m, min_area_px=5)] == [9, 8]
    assert mask_to_polygons(np.zeros((5, 5), bool)) == []


def _covered(geom, shape):
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]] + 0.5
    return shapely.contains_xy(geom, xx, yy)


def test_hole_closed_at_a_corner():
    # a ring of pixels closed by a diagonal step encloses a hole (background is
    # 4-connected); the hole's outline touches the exterior at that corner
    m = np.zeros((9, 9), bool)
    m[1, 1:7] = m[1:8, 1] = m[7, 1:8] = m[2:8, 7] = True  # (1, 6) -> (2, 7) is diagonal
    (g,) = mask_to_polygons(m)
    assert isinstance(g, Polygon) and g.is_valid and len(g.interiors) == 1
    assert g.area == m.sum()
    assert g.exterior.intersection(g.interiors[0]).equals(shapely.Point(7, 2))  # the corner
    assert (_covered(g, m.shape) == m).all()


def test_island_in_a_hole_joined_at_a_corner():
    # a filled square whose hole is a C of background around a 3x3 island; the island
    # joins the square only through the corner pixel (2, 2): one 8-connected object
    m = np.ones((9, 9), bool)
    m[2:7, 2:7] = False
    m[3:6, 3:6] = True
    m[2, 2] = True
    geoms = mask_to_polygons(m)
    assert len(geoms) == 1
    (g,) = geoms
    assert g.is_valid and g.area == m.sum() == 81 - 15
    assert (_covered(g, m.shape) == m).all()


@pytest.mark.parametrize("seed", range(6))
def test_random_masks_are_traced_exactly(seed):
    """Every pixel centre is inside exactly the geometry of its own object, nothing else."""
    rng = np.random.default_rng(seed)
    m = rng.random((28, 31)) < (0.3 + 0.08 * seed)  # many corner contacts, holes, islands
    geoms = mask_to_polygons(m)
    lab = label(m, connectivity=2)
    assert len(geoms) == lab.max()
    yy, xx = np.mgrid[0 : m.shape[0], 0 : m.shape[1]] + 0.5
    cover = np.zeros(m.shape, int)
    for i, g in enumerate(geoms, start=1):
        assert g.is_valid
        assert g.area == np.count_nonzero(lab == i)
        inside = shapely.contains_xy(g, xx, yy)
        assert (inside <= (lab == i)).all()
        cover += inside
        for p in getattr(g, "geoms", [g]):
            assert p.exterior.is_ccw and not any(r.is_ccw for r in p.interiors)
            for r in [p.exterior, *p.interiors]:
                c = np.asarray(r.coords)
                assert np.array_equal(c, np.round(c))  # on pixel edges
    assert (cover == m).all()


# ---------------------------------------------------------------------- GeoJSON
def test_geojson_polygons_in_level0_pixels(store):
    fc = labels_to_geojson(store)
    jsonschema.validate(fc, QUPATH_SCHEMA)
    by_class: dict[str, list] = {}
    for f in fc["features"]:
        assert f["properties"]["objectType"] == "annotation" and f["properties"]["isLocked"] is False
        uuid.UUID(f["id"])
        for ring in _rings(f["geometry"]):
            assert ring[0] == ring[-1] and len(ring) >= 4
        by_class.setdefault(f["properties"]["classification"]["name"], []).append(f)
    assert len({f["id"] for f in fc["features"]}) == len(fc["features"]) == 5
    gu, tuft, pt = get_tissue(GU), get_tissue(TUFT), get_tissue(PT)
    assert sorted(by_class) == sorted([gu.label, tuft.label, pt.label])  # artery: no objects
    for t in (gu, tuft, pt):
        assert all(f["properties"]["classification"]["color"] == list(t.rgb) for f in by_class[t.label])

    # glomerular unit: f = 2 um/px / 0.5 um/px = 4 slide pixels per label pixel
    sq, diag = by_class[gu.label]
    g = _to_shape(sq["geometry"])
    assert isinstance(g, Polygon) and len(g.interiors) == 1
    assert g.area == 84 * 4**2
    assert g.bounds == (16, 16, 56, 56)
    assert set(g.interiors[0].coords) == {(28, 28), (44, 28), (44, 44), (28, 44)}
    assert sq["properties"]["measurements"]["area_um2"] == pytest.approx(336.0)
    d = _to_shape(diag["geometry"])
    assert diag["geometry"]["type"] == "MultiPolygon" and d.area == 8 * 16
    assert diag["properties"]["measurements"]["area_um2"] == pytest.approx(32.0)
    for f in by_class[gu.label] + by_class[pt.label]:
        coords = np.array([xy for ring in _rings(f["geometry"]) for xy in ring])
        f_ = 4 if f in by_class[gu.label] else 2
        assert np.array_equal(coords % f_, np.zeros_like(coords))  # label-pixel edges on slide-pixel edges
    # unknown pixels (rows 40..44, cols 0..9 -> slide y 160..180, x 0..40) are not exported
    unknown = shapely.geometry.box(0, 160, 40, 180)
    assert not any(_to_shape(f["geometry"]).intersects(unknown) for f in fc["features"])

    # tuft: the label grid overhangs the 254 x 250 slide; the polygon is clipped to it
    (tf,) = by_class[tuft.label]
    assert _to_shape(tf["geometry"]).bounds == (248, 244, 254, 250)
    assert tf["properties"]["measurements"]["area_um2"] == pytest.approx(36 * L0_MPP**2)

    # proximal tubule: f = 2; two separate squares of 9 and 25 label pixels
    areas = sorted(_to_shape(f["geometry"]).area for f in by_class[pt.label])
    assert areas == [9 * 4, 25 * 4]
    assert sorted(f["properties"]["measurements"]["area_um2"] for f in by_class[pt.label]) == pytest.approx([9.0, 25.0])


def test_geojson_tissue_filter_level_choice_and_file(store, tmp_path):
    fc = labels_to_geojson(store, tissues=["capsule"])  # an alias of the glomerular unit
    assert {f["properties"]["classification"]["name"] for f in fc["features"]} == {get_tissue(GU).label}
    with pytest.raises(KeyError):
        labels_to_geojson(store, tissues=["peritubular_capillary"])  # not in this store

    # level choice: the finest level with <= max_pixels pixels
    assert choose_level(store, GU) == 0 and choose_level(store, PT) == 0
    assert choose_level(store, PT, max_pixels=63 * 64) == 1
    assert choose_level(store, PT, max_pixels=1) == store.n_levels(PT) - 1
    with pytest.raises(ValueError):
        choose_level(store, PT, level=9)
    fc1 = labels_to_geojson(store, tissues=[PT], max_pixels=63 * 64)
    lvl1 = store.read(PT, 1) == 1
    assert sum(_to_shape(f["geometry"]).area for f in fc1["features"]) == lvl1.sum() * 4**2
    for f in fc1["features"]:
        coords = np.array([xy for ring in _rings(f["geometry"]) for xy in ring])
        assert np.array_equal(coords % 4, np.zeros_like(coords))  # s = f * 2**1 = 4

    out = write_geojson(store.path, tmp_path / "out" / "s.geojson")
    back = json.loads(out.read_text())
    jsonschema.validate(back, QUPATH_SCHEMA)
    assert len(back["features"]) == 5
    assert not list(out.parent.glob(".*.tmp"))


# ---------------------------------------------------------------------- measurements
def test_measurements_counts_areas_and_csv(store, tmp_path):
    rows = {r["tissue"]: r for r in measurements(store)}
    assert list(rows) == [GU, TUFT, PT, ART]
    slide_mm2 = L0_SHAPE[0] * L0_SHAPE[1] * L0_MPP**2 / 1e6
    gu = rows[GU]
    assert gu["objects"] == 2  # the square with a hole, and the diagonal pair
    assert gu["area_um2"] == (84 + 8) * 2.0**2
    assert gu["mean_object_area_um2"] == (84 + 8) * 4.0 / 2
    assert gu["unknown_area_um2"] == 50 * 4.0
    assert gu["density_basis"] == "slide" and gu["tissue_area_mm2"] == pytest.approx(slide_mm2)
    assert gu["density_per_mm2"] == pytest.approx(2 / slide_mm2)
    assert gu["level"] == 0 and gu["pixel_size_um"] == 2.0
    assert rows[TUFT]["objects"] == 1 and rows[TUFT]["area_um2"] == 4 * 4.0  # label pixels, unclipped
    assert rows[PT]["objects"] == 2 and rows[PT]["area_um2"] == 34.0 and rows[PT]["unknown_area_um2"] == 0
    assert rows[ART]["objects"] == 0 and rows[ART]["area_um2"] == 0 and rows[ART]["mean_object_area_um2"] == 0

    r = measurements(store, tissue_area_mm2=0.5, tissues=[PT])
    assert [(x["tissue"], x["density_per_mm2"], x["density_basis"]) for x in r] == [(PT, 4.0, "argument")]
    r1 = measurements(store, tissues=[PT], level=1)[0]
    assert r1["level"] == 1 and r1["pixel_size_um"] == 2.0
    assert r1["area_um2"] == np.count_nonzero(store.read(PT, 1) == 1) * 4.0

    out = write_measurements_csv(store, tmp_path / "m.csv", tissue_area_mm2=2.0)
    with open(out, newline="") as fh:
        rd = csv.DictReader(fh)
        assert tuple(rd.fieldnames) == MEASUREMENT_COLUMNS
        back = list(rd)
    assert [b["tissue"] for b in back] == [GU, TUFT, PT, ART]
    want = measurements(store, tissue_area_mm2=2.0)
    for b, w in zip(back, want):
        assert int(b["objects"]) == w["objects"] and int(b["level"]) == w["level"]
        assert b["density_basis"] == "argument"
        for k in ("area_um2", "mean_object_area_um2", "density_per_mm2", "unknown_area_um2", "pixel_size_um"):
            assert float(b[k]) == w[k]


def test_density_from_store_metadata(tmp_path):
    st = _make_store(tmp_path / "t.ome.zarr", attrs={"tissue_area_mm2": 0.25})
    r = measurements(LabelStore(st.path), tissues=[GU])[0]
    assert r["density_basis"] == "store" and r["tissue_area_mm2"] == 0.25 and r["density_per_mm2"] == 8.0
    assert measurements(st, tissue_area_mm2=1.0, tissues=[GU])[0]["density_basis"] == "argument"
