"""Slide readers, resampling, tissue mask and pyramid writers, on real files.

Real data: the OpenSlide project's Aperio test slide ``CMU-1-Small-Region.svs``
(one level of 2220 px wide by 2967 px high, i.e. (H, W) = (2967, 2220), 240 x 240
JPEG tiles, MPP 0.499) and mosaics of the renal demo PNG patches, written here as
OME-TIFF and OME-Zarr pyramids.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile
import zarr

from napari_omniseg.slides import (
    CoarseSlideWarning,
    CorruptTileError,
    ImageSlide,
    MissingMppError,
    OmeZarrSlide,
    RegionOutsideError,
    SlideError,
    TiffSlide,
    block_mean,
    open_slide,
    openslide_available,
    tile_has_tissue,
    tissue_mask,
    write_ome_tiff_pyramid,
    write_ome_zarr_pyramid,
)

SVS = Path(__file__).resolve().parents[1] / "src" / "napari_omniseg" / "sample" / "CMU-1-Small-Region.svs"  # bundled (CC0)
SVS_HW = (2967, 2220)  # (H, W): the README's "2220 x 2967" is width x height


@pytest.fixture(scope="module")
def svs_path() -> Path:
    if not SVS.exists():
        pytest.skip(f"real SVS test slide not found at {SVS}")
    return SVS


@pytest.fixture(scope="module")
def svs_full(svs_path) -> np.ndarray:
    """The whole baseline level decoded by tifffile (the reference for region reads)."""
    return tifffile.imread(svs_path, series=0, level=0)


def _demo_patches(demo_dir: Path, n: int) -> list[np.ndarray]:
    files = sorted(p for p in demo_dir.glob("KI_data_testingset_demo/*/*/*.png") if "_mask_" not in p.name)
    return [imagecodecs.imread(str(f)) for f in files[:n]]


@pytest.fixture(scope="module")
def mosaic(demo_dir) -> np.ndarray:
    """4 x 5 real kidney patches (RGBA PNGs, alpha dropped): (1024, 1280, 3) uint8, not square."""
    tiles = [t[:, :, :3] for t in _demo_patches(demo_dir, 20)]
    return np.vstack([np.hstack(tiles[r * 5 : (r + 1) * 5]) for r in range(4)])


def _float_block_mean(a: np.ndarray, k: int) -> np.ndarray:
    H, W = a.shape[0] // k * k, a.shape[1] // k * k
    return a[:H, :W].reshape(H // k, k, W // k, k, -1).mean(axis=(1, 3))


# ------------------------------------------------------------------ the real Aperio SVS
def test_svs_metadata(svs_path):
    with open_slide(svs_path) as s:
        assert isinstance(s, TiffSlide) and s.format == "svs"
        assert s.levels == 1  # thumbnail, label and macro series are not levels
        assert s.shapes == [SVS_HW]
        assert s.downsamples == [1.0]
        assert s.mpp == pytest.approx(0.499) and s.file_mpp == pytest.approx(0.499)
        assert s.metadata["AppMag"] == 20.0
        assert s.metadata["tile"] == (240, 240)
        assert s.dtype == np.uint8


def test_svs_regions_match_tifffile(svs_path, svs_full):
    with open_slide(svs_path) as s:
        for y, x, h, w in [(0, 0, 64, 64), (100, 200, 300, 400), (235, 475, 250, 250), (2900, 2100, 67, 120)]:
            np.testing.assert_array_equal(s.read_region(0, y, x, h, w), svs_full[y : y + h, x : x + w])
        # partly outside: zero padded
        r = s.read_region(0, -10, 2210, 30, 20)
        assert r.shape == (30, 20, 3)
        assert not r[:10].any() and not r[:, 10:].any()
        np.testing.assert_array_equal(r[10:, :10], svs_full[:20, 2210:])
        # entirely outside: a ValueError naming the region and the slide's shape
        with pytest.raises(RegionOutsideError, match=r"y=3000.*2967 x 2220") as ei:
            s.read_region(0, 3000, 0, 10, 10)
        assert isinstance(ei.value, ValueError) and str(svs_path) in str(ei.value)


def test_svs_dask_level_is_lazy_and_exact(svs_path, svs_full):
    with open_slide(svs_path) as s:
        calls = []
        orig = s._read

        def counting(*a):
            calls.append(a)
            return orig(*a)

        s._read = counting
        d = s.dask_level(0)
        assert d.shape == SVS_HW + (3,) and d.dtype == np.uint8
        assert d.chunksize == (512, 512, 3)
        np.testing.assert_array_equal(d[10:20, 600:700].compute(), svs_full[10:20, 600:700])
        assert len(calls) == 1  # one chunk touched, one read
        np.testing.assert_array_equal(d.compute(scheduler="threads"), svs_full)


@pytest.mark.skipif(not openslide_available(), reason="openslide extra not installed")
def test_svs_through_openslide_matches_tifffile(svs_path, svs_full):
    from napari_omniseg.slides import OpenSlideSlide

    with OpenSlideSlide(svs_path) as s:
        assert s.shapes == [SVS_HW] and s.mpp == pytest.approx(0.499)
        np.testing.assert_array_equal(s.read_region(0, 100, 200, 300, 400), svs_full[100:400, 200:600])


def test_user_mpp_overrides_file(svs_path):
    with open_slide(svs_path, mpp=0.5) as s:
        assert s.mpp == 0.5 and s.file_mpp == pytest.approx(0.499) and s.mpp_source == "user"
    with pytest.raises(SlideError, match="positive"):
        open_slide(svs_path, mpp=-1)


# ------------------------------------------------------------------ read_at_mpp
def test_read_at_mpp_integer_factor_is_block_mean(svs_path, svs_full):
    with open_slide(svs_path) as s:
        # 0.998 um/px is exactly 2 x 0.499: a 2 x 2 block mean of level 0
        out = s.read_at_mpp(0.998, 101, 203, 150, 170)
        np.testing.assert_array_equal(out, block_mean(svs_full[101:401, 203:543], 2))
        assert np.abs(out - _float_block_mean(svs_full[101:401, 203:543], 2)).max() <= 0.5
        out4 = s.read_at_mpp(4 * 0.499, 0, 0, 100, 100)
        np.testing.assert_array_equal(out4, block_mean(svs_full[:400, :400], 4))
        # the same pixel size is a plain read
        np.testing.assert_array_equal(s.read_at_mpp(0.499, 7, 9, 50, 60), svs_full[7:57, 9:69])


def test_block_mean_rounds_half_up_and_handles_edges():
    a = np.array([[0, 1], [0, 0]], np.uint8)
    assert block_mean(a, 2)[0, 0] == 0  # 0.25 -> 0
    a = np.array([[1, 1], [0, 0]], np.uint8)
    assert block_mean(a, 2)[0, 0] == 1  # 0.5 -> 1
    b = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    m = block_mean(b, 2)
    assert m.shape == (3, 4, 3)
    assert m[2, 3, 0] == b[4, 6, 0]  # a 1 x 1 corner block is its own mean


def test_read_at_mpp_level_choice_and_resampling(tmp_path, mosaic):
    p = write_ome_tiff_pyramid(tmp_path / "m.ome.tif", mosaic, mpp=0.5, n_levels=3)
    with open_slide(p) as s:
        assert s.level_for_mpp(0.5) == 0
        assert s.level_for_mpp(0.5004) == 0  # within 0.1 %: no resampling needed
        assert s.level_for_mpp(0.9995) == 1
        assert s.level_for_mpp(1.5) == 1
        assert s.level_for_mpp(2.0) == 2 and s.level_for_mpp(100) == 2
        lv1, lv2 = s.dask_level(1).compute(), s.dask_level(2).compute()
        # a target equal to a level's pixel size reads that level
        np.testing.assert_array_equal(s.read_at_mpp(1.0, 64, 128, 100, 120), lv1[32:132, 64:184])
        np.testing.assert_array_equal(s.read_at_mpp(2.0, 64, 128, 50, 60), lv2[16:66, 32:92])
        # a non-integer factor (1.5 from level 1) is anti-aliased like skimage's resize
        from skimage.transform import resize

        out = s.read_at_mpp(1.5, 0, 0, 200, 240)
        ref = resize(lv1[:300, :360].astype(float), (200, 240, 3), anti_aliasing=True, preserve_range=True)
        assert out.shape == (200, 240, 3) and out.dtype == np.uint8
        assert np.abs(out - ref).mean() < 2.0
        # output pixels past the slide's edge are black, inside ones are not darkened
        out = s.read_at_mpp(1.0, 1000, 1200, 20, 60)
        assert not out[12:].any() and not out[:, 40:].any()
        np.testing.assert_array_equal(out[:12, :40], lv1[500:512, 600:640])
        with pytest.raises(RegionOutsideError, match="outside"):
            s.read_at_mpp(1.0, 1024, 0, 10, 10)


def test_read_at_mpp_subpixel_geometry(tmp_path):
    """Output pixel c covers level-0 [x0 + c f, x0 + (c + 1) f): on a ramp its value is the centre."""
    ramp = np.broadcast_to(np.arange(200, dtype=np.uint8)[None, :, None], (32, 200, 3)).copy()
    src = ImageSlide(ramp, mpp=1.0)
    for f, x0 in [(1.5, 10), (2.5, 7), (3.7, 1), (4.0, 4), (0.5, 3)]:
        w = int((190 - x0) / f)
        out = src.read_at_mpp(f, 0, x0, 8, w)[4, :, 0].astype(float)
        centre = x0 + (np.arange(w) + 0.5) * f - 0.5
        assert np.abs(out - centre)[:-3].max() <= 0.5, f
    # from pyramid levels, starting off the level's pixel grid (x0 odd on a 2x level)
    ramp2 = np.broadcast_to((2 * np.arange(128, dtype=np.uint8))[None, :, None], (64, 128, 3)).copy()
    p = write_ome_tiff_pyramid(tmp_path / "ramp.ome.tif", ramp2, mpp=1.0, n_levels=3)
    with open_slide(p) as s:
        for f, x0, level in [(3.0, 5, 1), (2.0, 3, 1), (5.0, 1, 2), (4.0, 3, 2)]:
            assert s.level_for_mpp(f) == level
            w = int((120 - x0) / f)
            out = s.read_at_mpp(f, 0, x0, 4, w)[2, :, 0].astype(float)
            centre = 2 * (x0 + (np.arange(w) + 0.5) * f - 0.5)
            assert np.abs(out - centre)[1:-2].max() <= 0.5, (f, x0)


def test_corrupt_tiles_are_reported_and_the_rest_stays_readable(tmp_path, svs_path, svs_full):
    svs = tmp_path / "corrupt.svs"
    data = bytearray(svs_path.read_bytes())
    with tifffile.TiffFile(svs_path) as t:  # tile 5 of the first row (columns 1200:1440)
        off, n = t.pages[0].dataoffsets[5], t.pages[0].databytecounts[5]
    data[off : off + 64] = bytes(64)  # the tile's JPEG header is gone
    svs.write_bytes(bytes(data))
    with open_slide(svs) as s:
        with pytest.raises(CorruptTileError, match=r"corrupt\.svs: cannot read level 0") as ei:
            s.read_region(0, 0, 5 * 240 + 10, 10, 10)
        assert isinstance(ei.value, SlideError)
        np.testing.assert_array_equal(s.read_region(0, 300, 0, 100, 100), svs_full[300:400, :100])


def test_read_at_mpp_upsamples_coarse_slide_with_one_warning(svs_path, svs_full):
    with open_slide(svs_path) as s, warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        a = s.read_at_mpp(0.2495, 100, 200, 64, 64)  # 40x from a 20x scan
        s.read_at_mpp(0.2495, 300, 300, 64, 64)
        coarse = [w for w in rec if issubclass(w.category, CoarseSlideWarning)]
        assert len(coarse) == 1  # once per source and target
        assert "lower resolution than the model was trained" in str(coarse[0].message)
        s.read_at_mpp(0.2, 100, 200, 8, 8)
        assert len([w for w in rec if issubclass(w.category, CoarseSlideWarning)]) == 2
    assert a.shape == (64, 64, 3)
    # 2x upsampling: each source pixel becomes about 2 x 2 output pixels
    np.testing.assert_allclose(block_mean(a, 2).astype(float), svs_full[100:132, 200:232], atol=40)
    assert np.abs(block_mean(a, 2).astype(float) - svs_full[100:132, 200:232]).mean() < 6


# ------------------------------------------------------------------ pyramid round trips
def test_ome_tiff_pyramid_round_trip(tmp_path, mosaic):
    p = write_ome_tiff_pyramid(tmp_path / "mosaic.ome.tif", mosaic, mpp=0.25, n_levels=3, tile=256)
    with tifffile.TiffFile(p) as t:
        assert t.is_ome and len(t.series[0].levels) == 3
    with open_slide(p) as s:
        assert isinstance(s, TiffSlide) and s.format == "ome-tiff"
        assert s.levels == 3
        assert s.shapes == [(1024, 1280), (512, 640), (256, 320)]
        assert s.downsamples == [1.0, 2.0, 4.0]
        assert s.mpp == pytest.approx(0.25)
        np.testing.assert_array_equal(s.dask_level(0).compute(), mosaic)
        lv1 = s.read_region(1, 0, 0, 512, 640)
        assert np.abs(lv1 - _float_block_mean(mosaic, 2)).max() <= 0.5
        assert np.abs(s.read_region(2, 0, 0, 256, 320) - _float_block_mean(mosaic, 4)).max() <= 1.0
    with pytest.raises(FileExistsError):
        write_ome_tiff_pyramid(p, mosaic, mpp=0.25, n_levels=2)


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_pyramid_round_trip(tmp_path, mosaic, version):
    p = write_ome_zarr_pyramid(tmp_path / "mosaic.ome.zarr", mosaic, mpp=0.5, n_levels=3, chunk=256, version=version)
    if version == "0.4":
        attrs = json.loads((p / ".zattrs").read_text())
        assert attrs["multiscales"][0]["version"] == "0.4"
        assert (p / "0" / ".zarray").exists()
    else:
        meta = json.loads((p / "zarr.json").read_text())
        assert meta["zarr_format"] == 3 and meta["attributes"]["ome"]["version"] == "0.5"
    with open_slide(p) as s:
        assert isinstance(s, OmeZarrSlide) and s.format == f"ome-zarr {version}"
        assert s.levels == 3
        assert s.shapes == [(1024, 1280), (512, 640), (256, 320)]
        assert s.downsamples == [1.0, 2.0, 4.0]
        assert s.mpp == pytest.approx(0.5)
        np.testing.assert_array_equal(s.read_region(0, 0, 0, 1024, 1280), mosaic)
        assert np.abs(s.dask_level(1, tile=256).compute() - _float_block_mean(mosaic, 2)).max() <= 0.5
        np.testing.assert_array_equal(s.read_at_mpp(1.0, 0, 0, 512, 640), block_mean(mosaic, 2))


def _zarr_image(path, data, axes, scale, zarr_format=3):
    root = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    root.create_array("0", data=data, chunks=data.shape)
    ms = {"axes": axes, "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}]}
    if zarr_format == 3:
        root.attrs["ome"] = {"version": "0.5", "multiscales": [ms]}
    else:
        root.attrs["multiscales"] = [{"version": "0.4", **ms}]
    return path


def test_ome_zarr_axes_units_and_missing_unit(tmp_path, mosaic):
    img = mosaic[:200, :300]
    sp = lambda n, u="micrometer": {"name": n, "type": "space", **({"unit": u} if u else {})}  # noqa: E731
    ch = {"name": "c", "type": "channel"}
    # channel last, nanometer
    p = _zarr_image(tmp_path / "yxc.zarr", img, [sp("y", "nanometer"), sp("x", "nanometer"), ch], [250.0, 250.0, 1.0])
    with open_slide(p) as s:
        assert s.mpp == pytest.approx(0.25) and s.shapes == [(200, 300)]
        np.testing.assert_array_equal(s.read_region(0, 10, 20, 50, 60), img[10:60, 20:80])
    # tczyx with singleton t and z, millimeter, zarr v2 (NGFF 0.4)
    data = np.moveaxis(img, -1, 0)[None, :, None]
    axes = [{"name": "t", "type": "time"}, ch, sp("z"), sp("y", "millimeter"), sp("x", "millimeter")]
    p = _zarr_image(tmp_path / "tczyx.zarr", data, axes, [1, 1, 1, 0.0005, 0.0005], zarr_format=2)
    with open_slide(p) as s:
        assert s.mpp == pytest.approx(0.5) and s.format == "ome-zarr 0.4"
        np.testing.assert_array_equal(s.read_region(0, 0, 0, 200, 300), img)
    # no unit on x: the scale is not a physical size, so --mpp is required
    p = _zarr_image(tmp_path / "nounit.zarr", img, [sp("y", None), sp("x", None), ch], [1.0, 1.0, 1.0])
    with pytest.raises(MissingMppError, match="--mpp"):
        open_slide(p)
    with open_slide(p, mpp=0.3) as s:
        assert s.mpp == 0.3
    # a z-stack is refused
    data = np.stack([img, img])
    p = _zarr_image(tmp_path / "zyxc.zarr", data, [sp("z"), sp("y"), sp("x"), ch], [1.0, 1.0, 1.0, 1.0])
    with pytest.raises(SlideError, match="z=2"):
        open_slide(p)


# ------------------------------------------------------------------ TIFF metadata and rejections
def test_ome_tiff_nanometer_unit(tmp_path, mosaic):
    p = tmp_path / "nm.ome.tif"
    tifffile.imwrite(p, mosaic[:256, :256], ome=True, photometric="rgb", tile=(128, 128),
                     metadata={"axes": "YXS", "PhysicalSizeX": 500.0, "PhysicalSizeXUnit": "nm"})
    with open_slide(p) as s:
        assert s.format == "ome-tiff" and s.mpp == pytest.approx(0.5)


def test_generic_tiff_resolution_and_missing_mpp(tmp_path, mosaic):
    img = mosaic[:512, :768]
    cm = tmp_path / "cm.tif"
    tifffile.imwrite(cm, img, photometric="rgb", tile=(256, 256), resolution=(1e4 / 0.25, 1e4 / 0.25),
                     resolutionunit="CENTIMETER")
    with open_slide(cm) as s:
        assert s.format == "tiff" and s.mpp == pytest.approx(0.25) and s.shapes == [(512, 768)]
        np.testing.assert_array_equal(s.read_region(0, 100, 300, 200, 400), img[100:300, 300:700])
    inch = tmp_path / "inch.tif"
    tifffile.imwrite(inch, img, photometric="rgb", resolution=(72, 72), resolutionunit="INCH")
    with pytest.raises(MissingMppError, match="--mpp") as ei:
        open_slide(inch)
    assert str(inch) in str(ei.value) and "inch" in str(ei.value)
    with open_slide(inch, mpp=0.5) as s:  # a plain (striped) TIFF with a user pixel size
        assert s.mpp == 0.5
        np.testing.assert_array_equal(s.read_region(0, 0, 0, 512, 768), img)


def test_generic_tiff_reduced_pages_are_levels(tmp_path, mosaic):
    p = tmp_path / "reduced.tif"
    with tifffile.TiffWriter(p) as tw:
        tw.write(mosaic, photometric="rgb", tile=(256, 256), resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
        tw.write(block_mean(mosaic, 2), photometric="rgb", tile=(256, 256), subfiletype=1)
    with open_slide(p) as s:
        assert s.shapes == [(1024, 1280), (512, 640)] and s.downsamples == [1.0, 2.0]
        assert s.mpp == pytest.approx(0.5)
        np.testing.assert_array_equal(s.read_region(1, 0, 0, 512, 640), block_mean(mosaic, 2))


def test_tiff_rejects_non_rgb_and_deep_images(tmp_path, mosaic):
    cases = {
        "u16.tif": ((mosaic.astype(np.uint16) * 257), dict(photometric="rgb"), r"expected 8-bit RGB, got uint16"),
        "gray.tif": (mosaic[:, :, 0], {}, r"expected 8-bit RGB, got 1 channel"),
        "two.tif": (mosaic[:, :, :2], dict(photometric="minisblack", planarconfig="contig"), r"got 2 channels"),
        "float.tif": (mosaic.astype(np.float32) / 255, dict(photometric="rgb"), r"expected 8-bit RGB, got float32"),
    }
    for name, (data, kw, msg) in cases.items():
        p = tmp_path / name
        tifffile.imwrite(p, data, resolution=(2e4, 2e4), resolutionunit="CENTIMETER", **kw)
        with pytest.raises(SlideError, match=msg) as ei:
            open_slide(p)
        assert str(p) in str(ei.value)


def test_rgba_tiff_drops_alpha(tmp_path, mosaic):
    rgba = np.dstack([mosaic, np.full(mosaic.shape[:2], 7, np.uint8)])
    p = tmp_path / "rgba.tif"
    tifffile.imwrite(p, rgba, photometric="rgb", extrasamples=["unassalpha"], tile=(256, 256),
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    with open_slide(p) as s:
        assert s.metadata["alpha_dropped"]
        np.testing.assert_array_equal(s.read_region(0, 0, 0, 1024, 1280), mosaic)


# ------------------------------------------------------------------ plain images, open_slide routing
def test_png_needs_mpp(demo_dir):
    png = sorted(p for p in demo_dir.glob("KI_data_testingset_demo/0_1_dt/he/*.png") if "_mask_" not in p.name)[0]
    with pytest.raises(MissingMppError, match="--mpp") as ei:
        open_slide(png)
    assert str(png) in str(ei.value)
    with open_slide(png, mpp=1.0) as s:
        assert isinstance(s, ImageSlide) and s.shapes == [(256, 256)] and s.levels == 1
        np.testing.assert_array_equal(s.read_region(0, 0, 0, 256, 256), imagecodecs.imread(str(png))[:, :, :3])
    with open_slide(png, require_mpp=False) as s:  # viewable, but the pixel size is asked for when needed
        with pytest.raises(MissingMppError, match="--mpp"):
            s.read_at_mpp(2.0, 0, 0, 8, 8)


def test_open_slide_errors(tmp_path, monkeypatch):
    with pytest.raises(SlideError, match="no such file"):
        open_slide(tmp_path / "nope.svs")
    (tmp_path / "folder").mkdir()
    with pytest.raises(SlideError, match="not a Zarr store"):
        open_slide(tmp_path / "folder")
    junk = tmp_path / "junk.xyz"
    junk.write_bytes(b"not a slide at all")
    monkeypatch.setitem(sys.modules, "openslide", None)  # as if the extra were not installed
    with pytest.raises(SlideError, match="unrecognised slide format"):
        open_slide(junk)
    ndpi = tmp_path / "scan.ndpi"
    ndpi.write_bytes(b"II*\x00" + b"\x00" * 16)
    with pytest.raises(SlideError, match=r"pip install napari-omniseg\[openslide\]"):
        open_slide(ndpi)
    bad = tmp_path / "bad.svs"
    bad.write_bytes(b"II*\x00garbage")
    with pytest.raises(SlideError, match="bad.svs"):
        open_slide(bad)


# ------------------------------------------------------------------ tissue mask
@pytest.mark.parametrize("background", [255, 0])
def test_tissue_mask_on_padded_demo_mosaic(mosaic, background):
    pad = 512  # 256 um of glass (or black padding) around 512 x 640 um of kidney
    canvas = np.full((1024 + 2 * pad, 1280 + 2 * pad, 3), background, np.uint8)
    canvas[pad:-pad, pad:-pad] = mosaic
    src = ImageSlide(canvas, mpp=0.5)
    mask, mask_mpp = tissue_mask(src)
    assert mask_mpp == 16.0
    f = int(mask_mpp / 0.5)  # 32 level-0 px per mask px
    assert mask.shape == (canvas.shape[0] // f, canvas.shape[1] // f)
    m = pad // f  # margin width in mask pixels
    inner = mask[m:-m, m:-m]
    margin = mask.copy()
    margin[m:-m, m:-m] = False
    assert not margin.any(), "tissue found on the empty margin"
    assert inner.mean() > 0.9, f"only {inner.mean():.0%} of the tissue found"
    # tiles: inside the tissue, on the margin, past the slide
    assert tile_has_tissue(mask, mask_mpp, pad + 100, pad + 100, 256, 256, 0.5)
    assert not tile_has_tissue(mask, mask_mpp, 0, 0, 256, 256, 0.5)
    assert not tile_has_tissue(mask, mask_mpp, 10_000, 10_000, 256, 256, 0.5)


def _glass(rng, shape) -> np.ndarray:
    """Slide glass as scanners show it: off-white with a faint blue-grey tint and noise
    (darkest channel near 233, below the pure-white cut of the mask)."""
    base = np.array([238.0, 236.0, 241.0])
    return np.clip(base + rng.normal(0, 2.5, (*shape, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("stain", ["pas", "he", "sil", "tri"])
def test_tissue_mask_skips_glass_keeps_every_tissue_tile_per_stain(demo_dir, stain):
    """Real kidney patches of one stain laid as a checkerboard on glass (6 x 6 cells of
    256 um: a glass border, then tissue and glass alternating): every tissue cell's tile
    must be run, and the glass tiles skipped."""
    files = sorted(p for p in demo_dir.glob(f"KI_data_testingset_demo/*/{stain}/*.png") if "_mask_" not in p.name)
    assert files, f"no {stain} patches"
    patches = [imagecodecs.imread(str(f))[:256, :256, :3] for f in files]
    rng = np.random.default_rng(7)
    C, n = 256, 6
    canvas = _glass(rng, (n * C, n * C))
    tissue_cells, glass_cells, k = [], [], 0
    for i in range(n):
        for j in range(n):
            inner = 0 < i < n - 1 and 0 < j < n - 1
            if inner and (i + j) % 2 == 0:
                canvas[i * C : (i + 1) * C, j * C : (j + 1) * C] = patches[k % len(patches)]
                tissue_cells.append((i, j))
                k += 1
            else:
                glass_cells.append((i, j))
    src = ImageSlide(canvas, mpp=1.0)  # patches placed as 256 um cells
    mask, mask_mpp = tissue_mask(src)
    kept = {c: tile_has_tissue(mask, mask_mpp, c[0] * C, c[1] * C, C, C, 1.0) for c in tissue_cells + glass_cells}
    lost = [c for c in tissue_cells if not kept[c]]
    skipped = sum(not kept[c] for c in glass_cells) / len(glass_cells)
    print(f"{stain}: {len(tissue_cells)} tissue tiles, {len(lost)} lost; {skipped:.0%} of {len(glass_cells)} glass tiles skipped")
    assert not lost, f"{stain}: tissue tiles lost {lost}"
    assert skipped >= 0.9, f"{stain}: only {skipped:.0%} of glass tiles skipped"


@pytest.mark.parametrize("name", ["renal_5x", "renal_10x", "renal_40x"])
def test_tissue_mask_on_the_bundled_sample_keeps_every_patch(name):
    """The bundled pale-PAS-heavy sample mosaics: every labelled patch lies in tissue
    (the mask once found none on them)."""
    import napari_omniseg

    root = Path(napari_omniseg.__file__).parent / "sample"
    meta = {m["name"]: m for m in json.loads((root / "sample.json").read_text())["mosaics"]}[name]
    with open_slide(root / meta["image"]) as s:
        mask, mask_mpp = tissue_mask(s)
        mpp = float(s.mpp)
    missed = [p["file"] for p in meta["patches"]
              if not tile_has_tissue(mask, mask_mpp, p["y"], p["x"], p["h"], p["w"], mpp, min_fraction=0.5)]
    assert not missed, f"{name}: patches judged glass: {missed}"


def test_tissue_mask_real_svs(svs_path):
    with open_slide(svs_path) as s:
        mask, mask_mpp = tissue_mask(s)
    assert mask.shape == (-(-2967 * 0.499 // 16), -(-2220 * 0.499 // 16))
    assert 0.2 < mask.mean() < 0.6  # a strip of skin on mostly empty glass
    assert not mask[:20, :15].any()  # the top-left corner of this slide is glass


def test_tissue_mask_real_svs_tiles(svs_path, svs_full):
    """On a grid of 256 px tiles of the real H&E slide, judged at full resolution: a tile
    with under 0.1 % stained pixels (saturation > 0.15) is glass, one with 5 % or more is
    tissue.  Glass tiles are skipped, and no tissue tile is lost."""
    with open_slide(svs_path) as s:
        mask, mask_mpp = tissue_mask(s)
        mpp = float(s.mpp)
    a = svs_full.astype(np.float32) / 255
    mx = a.max(-1)
    stained = (mx - a.min(-1)) / np.maximum(mx, 1e-6) > 0.15
    T, (H, W) = 256, stained.shape
    glass, lost, skipped, tissue = 0, [], 0, 0
    for y in range(0, H, T):
        for x in range(0, W, T):
            frac = stained[y : y + T, x : x + T].mean()
            run = tile_has_tissue(mask, mask_mpp, y, x, min(T, H - y), min(T, W - x), mpp)
            if frac < 0.001:
                glass += 1
                skipped += not run
            elif frac >= 0.05:
                tissue += 1
                if not run:
                    lost.append((y, x))
    print(f"CMU-1-Small-Region: {skipped} of {glass} glass tiles skipped, {len(lost)} of {tissue} tissue tiles lost")
    assert glass >= 30 and tissue >= 40
    assert not lost
    assert skipped / glass >= 0.9


# ------------------------------------------------------------------ hygiene
def test_slides_core_imports_no_qt_napari_or_torch():
    code = (
        "import sys, napari_omniseg.slides\n"
        "bad = [m for m in ('torch', 'napari', 'qtpy', 'PyQt5', 'PySide2', 'PIL') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
