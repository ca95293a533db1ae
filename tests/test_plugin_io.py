"""Readers, writers and sample data of the napari plugin (no viewer needed for most)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from napari_omniseg import _reader, _writer
from napari_omniseg._widgets._layers import META_KEY
from napari_omniseg.tissues import get_tissue

SVS = Path(__file__).resolve().parents[1] / "src" / "napari_omniseg" / "sample" / "CMU-1-Small-Region.svs"  # bundled (CC0)
DT = get_tissue("distal_tubule")
CAP = get_tissue("glomerular_unit")


@pytest.fixture
def svs():
    if not SVS.exists():
        pytest.skip("CMU-1-Small-Region.svs not available")
    return SVS


def test_slide_reader_gives_a_micron_scaled_rgb_layer(svs):
    reader = _reader.get_slide_reader(str(svs))
    assert reader is not None
    ((data, kw, kind),) = reader(str(svs))
    assert kind == "image" and kw["rgb"] is True
    assert tuple(data.shape) == (2967, 2220, 3) and data.dtype == np.uint8
    assert kw["scale"] == pytest.approx((0.499, 0.499))
    assert kw["units"] == ("micrometer", "micrometer")
    assert kw["metadata"]["path"] == str(svs.resolve()) and kw["metadata"]["mpp"] == pytest.approx(0.499)
    np.testing.assert_array_equal(np.asarray(data[100:110, 200:220]),
                                  _reader.read_slide(str(svs))[0][0][100:110, 200:220].compute())


def test_readers_decline_what_they_do_not_handle(tmp_path):
    import tifffile

    (tmp_path / "a.txt").write_text("x")
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, np.zeros((20, 20, 3), np.uint8))  # no pyramid, no pixel size, not tiled
    assert _reader.get_slide_reader(str(tmp_path / "a.txt")) is None
    assert _reader.get_slide_reader(str(plain)) is None
    assert _reader.get_slide_reader(str(tmp_path / "missing.svs")) is None
    assert _reader.get_zarr_reader(str(tmp_path)) is None
    assert _reader.get_slide_reader([str(plain), str(plain)]) is None


def _working_layer(tissue, data, origin, factor, shape0=(600, 800), mpp0=0.5):
    md = {META_KEY: {"kind": "working", "tissue": tissue.name, "origin": list(origin), "factor": factor,
                     "mpp": tissue.mpp, "level0_shape": list(shape0), "level0_mpp": mpp0, "slide": "s.svs",
                     "model_version": "m@1"}}
    return (data, {"name": tissue.label, "metadata": md}, "labels")


def test_labels_round_trip_through_ome_zarr(tmp_path):
    rng = np.random.default_rng(0)
    dt = (rng.random((120, 90)) > 0.6).astype(np.uint8)
    dt[0, 0] = 255
    cap = (rng.random((40, 50)) > 0.5).astype(np.uint8)
    layers = [_working_layer(DT, dt, (10, 20), 2.0), _working_layer(CAP, cap, (5, 6), 4.0),
              (np.zeros((5, 5), np.uint8), {"name": "tissue map", "metadata": {META_KEY: {"kind": "map"}}}, "labels")]
    (out,) = _writer.write_labels_zarr(str(tmp_path / "seg.ome.zarr"), layers)
    reader = _reader.get_zarr_reader(out)
    assert reader is _reader.read_label_store
    got = {kw["metadata"][META_KEY]["tissue"]: (d, kw) for d, kw, kind in reader(out)}
    assert set(got) == {"distal_tubule", "glomerular_unit", "tissue_map"}
    d, kw = got["distal_tubule"]
    lvl0 = np.asarray(d[0] if isinstance(d, list) else d)
    np.testing.assert_array_equal(lvl0[10:130, 20:110], dt)
    assert lvl0.sum() == dt.astype(int).sum()
    # placed in microns over the slide: pixel i covers level-0 [i f, (i + 1) f)
    assert kw["scale"] == (1.0, 1.0) and kw["translate"] == pytest.approx((0.25, 0.25))
    assert kw["name"] == DT.label and kw["colormap"][1] == DT.color
    d2, kw2 = got["glomerular_unit"]
    lvl0 = np.asarray(d2[0] if isinstance(d2, list) else d2)
    np.testing.assert_array_equal(lvl0[5:45, 6:56], cap)
    assert kw2["scale"] == (2.0, 2.0) and kw2["translate"] == pytest.approx((0.75, 0.75))
    # napari opens it too, through the plugin
    import npe2

    npe2.PluginManager.instance().discover()
    layer_data = npe2.read([out], stack=False, plugin_name="napari-omniseg")
    assert [ld[2] for ld in layer_data] == ["labels"] * 3


def test_writer_refuses_foreign_layers(tmp_path):
    with pytest.raises(_writer.WriterError, match="not made by napari-omniseg"):
        _writer.write_labels_zarr(str(tmp_path / "x.ome.zarr"), [(np.zeros((4, 4), np.uint8), {"name": "mine"}, "labels")])
    a = _working_layer(DT, np.zeros((4, 4), np.uint8), (0, 0), 2.0)
    with pytest.raises(_writer.WriterError, match="two layers"):
        _writer.write_labels_zarr(str(tmp_path / "x.ome.zarr"), [a, a])


def test_geojson_writer_in_level0_pixels(tmp_path):
    dt = np.zeros((60, 60), np.uint8)
    dt[10:20, 30:45] = 1  # one object: 15 x 10 px at 10x = 30 x 20 level-0 px at 0.5 um/px
    (out,) = _writer.write_labels_geojson(str(tmp_path / "s.geojson"), [_working_layer(DT, dt, (100, 200), 2.0)])
    fc = json.loads(Path(out).read_text())
    (feat,) = fc["features"]
    assert feat["properties"]["classification"]["name"] == DT.label
    xs = [p[0] for p in feat["geometry"]["coordinates"][0]]
    ys = [p[1] for p in feat["geometry"]["coordinates"][0]]
    assert (min(xs), max(xs)) == ((200 + 30) * 2, (200 + 45) * 2)
    assert (min(ys), max(ys)) == ((100 + 10) * 2, (100 + 20) * 2)
    assert feat["properties"]["measurements"]["area_um2"] == pytest.approx(15 * 10 * 1.0)


def test_renal_sample_is_real_tissue_at_true_scale(full_demo):
    demo_dir = full_demo
    from napari_omniseg._sample_data import build_renal_mosaic, renal_sample

    (img, kw, kind), (gt, gkw, gkind) = renal_sample()
    assert kind == "image" and gkind == "labels"
    assert img.shape == (1024, 1024, 3) and img.dtype == np.uint8
    assert kw["metadata"]["mpp"] == 1.0 and kw["scale"] == (1.0, 1.0)
    # every patch of the test split at 10x is in, labelled for its tissues
    _img, _gt, patches = build_renal_mosaic(demo_dir, "test")
    assert len(patches) == 12
    assert set(np.unique(gt)) <= {0, 1, 2, 5}
    assert {t for p in patches for t in p["tissues"]} == {"distal_tubule", "proximal_tubule", "artery"}
    # the first patch is the image file itself (RGB of the RGBA PNG)
    from napari_omniseg.training.data import read_image

    p0 = patches[0]
    y, x, h, w = p0["box"]
    src = next(demo_dir.rglob(f"{p0['stain']}/{p0['file']}"))
    np.testing.assert_array_equal(img[y : y + h, x : x + w], read_image(src))


def test_cmu_sample(svs):
    from napari_omniseg._sample_data import cmu_slide_sample

    ((data, kw, kind),) = cmu_slide_sample()
    assert kind == "image" and kw["metadata"]["mpp"] == pytest.approx(0.499)


def test_array_source_reads_like_a_slide():
    from napari_omniseg._widgets._sources import ArraySource, SourceError

    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    src = ArraySource(img, 0.25, name="a")
    assert src.shapes == [(64, 96)] and src.levels == 1
    out = src.read_at_mpp(1.0, 8, 12, 10, 12)  # 4 x 4 block means
    ref = img[8:48, 12:60].reshape(10, 4, 12, 4, 3).astype(np.float64).mean(axis=(1, 3))
    assert np.abs(out.astype(float) - ref).max() <= 0.5 + 1e-9
    grey = ArraySource(img[..., 0].astype(np.float32) / 255.0, 0.5)
    assert grey.read_region(0, 0, 0, 4, 4).shape == (4, 4, 3)
    with pytest.raises(SourceError, match="um/px"):
        ArraySource(img, None)
    with pytest.raises(SourceError, match="RGB"):
        ArraySource(np.zeros((4, 4, 4, 4)), 1.0)


def test_renal_sample_falls_back_to_the_bundled_mosaic(monkeypatch):
    from napari_omniseg import _sample_data as sd

    if not (Path(sd.__file__).parent / "sample" / "sample.json").exists():
        pytest.skip("this build has no bundled sample")

    def missing():
        raise sd.SampleDataMissing("renal demo data not found")

    monkeypatch.setattr(sd, "find_demo_dir", missing)
    (img, kw, _), (gt, _gkw, _) = sd.renal_sample()
    assert img.ndim == 3 and img.shape[2] == 3 and gt.shape == img.shape[:2]
    assert kw["metadata"]["mpp"] == 1.0 and set(np.unique(gt)) <= {0, 1, 2, 5} and gt.any()
