"""The ``omniseg`` command end to end on real files written by the tests."""

import json

import numpy as np
import pytest
import torch

from napari_omniseg.cli import main
from napari_omniseg.labels.store import MAP_NAME, LabelStore
from napari_omniseg.model import new_checkpoint, save_checkpoint
from napari_omniseg.slides import write_ome_tiff_pyramid
from napari_omniseg.training.data import load_arrays, load_dataset, select


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory):
    ck = new_checkpoint(seed=0)
    with torch.no_grad():
        ck.model.controller_weight.normal_(0, 0.5)
    return save_checkpoint(ck.model, tmp_path_factory.mktemp("ck") / "m.safetensors")


@pytest.fixture(scope="module")
def slide(demo_dir, tmp_path_factory):
    """A 2-level OME-TIFF at 0.5 um/px built from real 10x demo patches, white around them."""
    s = load_arrays([x for x in select(load_dataset(demo_dir), "val") if x.tissue.magnification == 10][:2])
    img = np.full((320, 600, 3), 250, np.uint8)
    img[30:286, 20:276] = s[0].image
    img[30:286, 320:576] = s[1].image
    p = tmp_path_factory.mktemp("slide") / "mosaic.ome.tif"
    write_ome_tiff_pyramid(p, img, mpp=0.5, n_levels=2, tile=128)
    return p


def test_info_json(ckpt_path, capsys):
    assert main(["info", "--checkpoint", str(ckpt_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_parameters"] == 6_913_594
    assert [(t["short"], t["magnification"]) for t in info["tissues"]] == [
        ("dt", 10), ("pt", 10), ("cap", 5), ("tuft", 5), ("ves", 10), ("ptc", 40)]


def test_evaluate_json(ckpt_path, demo_dir, capsys):
    assert main(["evaluate", "--checkpoint", str(ckpt_path), "--data", str(demo_dir), "--split", "val", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == len(select(load_dataset(demo_dir), "val")) and 0 <= out["mean_dice"] <= 1
    assert set(out["per_tissue"]) == {"distal_tubule", "proximal_tubule", "glomerular_unit", "glomerular_tuft",
                                      "artery", "peritubular_capillary"}
    for v in out["per_tissue"].values():
        assert {"dice", "hd95_um", "msd_um", "n"} <= set(v)


def test_segment_and_export(ckpt_path, slide, tmp_path, capsys):
    out = tmp_path / "res.ome.zarr"
    args = ["segment", str(slide), "-o", str(out), "--checkpoint", str(ckpt_path), "--tissues", "dt", "cap",
            "--tile", "128", "--margin", "16", "-q"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "tiles to run" in err and "estimated" in err
    st = LabelStore(out)
    assert st.complete and st.tissue_names == ["distal_tubule", "glomerular_unit"]
    assert st.level("distal_tubule", 0).shape == (160, 300)
    assert st.level(MAP_NAME, 0).shape == (160, 300)
    gj, csvp = tmp_path / "r.geojson", tmp_path / "r.csv"
    assert main(["export", str(out), "--geojson", str(gj), "--measurements", str(csvp)]) == 0
    fc = json.loads(gj.read_text())
    assert fc["type"] == "FeatureCollection"
    assert {f["properties"]["classification"]["name"] for f in fc["features"]} <= {"Distal tubule", "Glomerular unit (with Bowman capsule)"}
    assert "distal_tubule" in csvp.read_text()
    # rerunning the finished job recomputes nothing
    assert main(args) == 0
    assert "blocks resumed" in capsys.readouterr().err


def test_segment_region_and_clear_errors(ckpt_path, slide, tmp_path, capsys):
    out = tmp_path / "reg.ome.zarr"
    assert main(["segment", str(slide), "-o", str(out), "-c", str(ckpt_path), "--tissues", "dt", "--region", "0", "0",
                 "700", "10", "-q"]) == 2
    assert "outside the slide" in capsys.readouterr().err
    png = tmp_path / "x.png"
    import imageio.v3 as iio

    iio.imwrite(png, np.zeros((32, 32, 3), np.uint8))
    assert main(["segment", str(png), "-o", str(tmp_path / "p.ome.zarr"), "-c", str(ckpt_path), "-q"]) == 2
    assert "--mpp" in capsys.readouterr().err
    assert main(["segment", str(slide), "-o", str(out), "-c", str(ckpt_path), "--tissues", "kidney", "-q"]) == 2
    assert "unknown tissue" in capsys.readouterr().err


def test_dask_cluster_gives_identical_output(ckpt_path, slide, tmp_path):
    distributed = pytest.importorskip("distributed")
    common = ["-c", str(ckpt_path), "--tissues", "dt", "tuft", "--tile", "128", "--margin", "16", "-q", "--threads", "1"]
    assert main(["segment", str(slide), "-o", str(tmp_path / "local.ome.zarr"), *common]) == 0
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cl:
        assert main(["segment", str(slide), str(slide), "-o", str(tmp_path / "dist"), "--scheduler",
                     cl.scheduler_address, *common]) == 0
    a = LabelStore(tmp_path / "local.ome.zarr")
    outs = sorted((tmp_path / "dist").glob("*.ome.zarr"))
    assert len(outs) == 2, outs  # the slide was given twice: two outputs, never one overwritten
    for out in outs:
        b = LabelStore(out)
        assert b.complete
        for name in ["distal_tubule", "glomerular_tuft", MAP_NAME]:
            np.testing.assert_array_equal(a.read(name), b.read(name), err_msg=name)


def test_multi_slide_outputs_never_collide(tmp_path):
    from napari_omniseg.inference.cli import _outputs, slide_stem

    assert slide_stem("x/case.a.ome.tif") == "case.a" and slide_stem("k.svs") == "k"
    outs = _outputs(["a/case.a.ome.tif", "a/case.b.ome.tif", "s1/kidney.ome.tif", "s2/kidney.ome.tif"], tmp_path)
    assert len(set(outs)) == 4
    assert [p.name for p in outs[:2]] == ["case.a.ome.zarr", "case.b.ome.zarr"]
    assert {p.name for p in outs[2:]} == {"s1-kidney.ome.zarr", "s2-kidney.ome.zarr"}
    assert len(set(_outputs(["a/k.svs", "b/a/k.svs", "c/a/k.svs"], tmp_path))) == 3
