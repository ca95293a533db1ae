"""Hostile inputs reach the CLI user as one line naming the file and the problem (rc 2),
never as a Python traceback.  The CLI runs as a subprocess, as a user runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from napari_omniseg.model import new_checkpoint, save_checkpoint
from napari_omniseg.slides import write_ome_tiff_pyramid


def _cli(*args, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("OMNISEG_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "napari_omniseg", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    ck = new_checkpoint(seed=0)
    with torch.no_grad():
        ck.model.controller_weight.normal_(0, 0.5)
    ckpt = save_checkpoint(ck.model, d / "m.safetensors")
    img = np.full((256, 256, 3), 200, np.uint8)
    img[64:192, 64:192] = (150, 60, 120)
    slide = d / "s.ome.tif"
    write_ome_tiff_pyramid(slide, img, mpp=0.5, n_levels=1, tile=128)
    store = d / "good.ome.zarr"
    r = _cli("segment", slide, "-o", store, "-c", ckpt, "--tissues", "dt", "--tile", "128", "--margin", "16", "-q",
             "--no-skip-background")
    assert r.returncode == 0, r.stderr
    return d, ckpt, slide, store


def _broken_copy(store, d, name):
    out = d / name
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(store, out)
    return out


def _sidecar_variant(d, ckpt, name, edit):
    p = d / f"{name}.safetensors"
    shutil.copy(ckpt, p)
    side = json.loads(ckpt.with_suffix(".json").read_text())
    p.with_suffix(".json").write_text(json.dumps(edit(side)))
    return p


CASES = ["truncated-ome-tiff", "manifest-not-utf8", "out-under-a-file", "store-broken-zarr-json", "store-missing-level",
         "sidecar-is-a-list", "sidecar-bad-version", "sidecar-huge-width", "sidecar-zero-std", "progress-json-broken"]


@pytest.mark.parametrize("case", CASES)
def test_one_line_error_never_a_traceback(files, case):
    d, ckpt, slide, store = files
    if case == "truncated-ome-tiff":
        t = d / "cut.ome.tif"
        t.write_bytes(slide.read_bytes()[: slide.stat().st_size // 3])
        args, names = ["segment", t, "-o", d / "cut.ome.zarr", "-c", ckpt, "--tissues", "dt", "-q"], "truncated"
    elif case == "manifest-not-utf8":
        m = d / "manifest.csv"
        m.write_bytes("image_path,label_path,tissue\nimg\xe9.png,m.png,dt\n".encode("latin-1"))
        args, names = ["evaluate", "-c", ckpt, "--data", m], "manifest.csv"
    elif case == "out-under-a-file":
        (d / "afile").write_text("x")
        args, names = ["segment", slide, "-o", d / "afile" / "o.ome.zarr", "-c", ckpt, "--tissues", "dt", "-q"], "afile"
    elif case == "store-broken-zarr-json":
        b = _broken_copy(store, d, "b1.ome.zarr")
        (b / "zarr.json").write_text("{not json")
        args, names = ["export", b, "--measurements", d / "m1.csv"], "b1.ome.zarr"
    elif case == "store-missing-level":
        b = _broken_copy(store, d, "b2.ome.zarr")
        levels = sorted(p for p in (b / "labels" / "distal_tubule").iterdir() if p.is_dir())
        shutil.rmtree(levels[0])
        args, names = ["export", b, "--measurements", d / "m2.csv"], "b2.ome.zarr"
    elif case == "sidecar-is-a-list":
        args, names = ["info", "-c", _sidecar_variant(d, ckpt, "list", lambda s: [s])], "list"
    elif case == "sidecar-bad-version":
        args, names = ["info", "-c", _sidecar_variant(d, ckpt, "ver", lambda s: {**s, "format_version": "abc"})], "ver"
    elif case == "sidecar-huge-width":
        def edit(s):
            s["architecture"]["widths"][4] = 200000
            return s
        args, names = ["info", "-c", _sidecar_variant(d, ckpt, "wide", edit)], "wide"
    elif case == "sidecar-zero-std":
        def edit(s):
            s["normalization"]["std"] = [0, 0, 0]
            return s
        args, names = ["segment", slide, "-o", d / "z.ome.zarr", "-c", _sidecar_variant(d, ckpt, "std0", edit),
                       "--tissues", "dt", "-q"], "std0"
    elif case == "progress-json-broken":
        b = _broken_copy(store, d, "b3.ome.zarr")
        progress = next(b.rglob("progress.json"), None)
        if progress is None:
            pytest.skip("this store keeps no progress.json")
        progress.write_text("{truncated")
        args, names = ["segment", slide, "-o", b, "-c", ckpt, "--tissues", "dt", "--tile", "128", "--margin", "16",
                       "-q", "--no-skip-background"], "progress.json"
    r = _cli(*args)
    err = r.stderr.strip()
    if case == "progress-json-broken":  # only a record of finished blocks: recomputed, same output
        assert r.returncode == 0 and "Traceback" not in err and "progress.json" in err and "recomputed" in err, err
        return
    assert "Traceback" not in err, err
    assert r.returncode == 2, (r.returncode, err)
    last = err.splitlines()[-1]
    assert last.startswith("error: ") and names in last, err


def test_train_with_negatives_from_the_command_line(demo_dir, tmp_path):
    """`omniseg train --negatives 1 --zoom 0.5` as a user runs it: one epoch on real
    patches, and the checkpoint records the zoom and which heads got negatives from
    which labelled tissue; a zoom that is not a probability is refused."""
    out = tmp_path / "neg.safetensors"
    r = _cli("train", "--data", demo_dir, "--epochs", "1", "--crop", "64", "--batch-size", "2", "--val-split", "none",
             "--test-split", "none", "--negatives", "1", "--zoom", "0.5", "--defocus", "0.3", "--lab-transfer", "0.5", "--threads", "1",
             "--statistics", "tissue", "--out", out,
             "-q")
    assert r.returncode == 0, r.stderr[-2000:]
    from napari_omniseg.model import load_checkpoint

    ck = load_checkpoint(out)
    assert ck.model.cfg.statistics == "tissue"  # --statistics tissue: the engine will use it so
    prov = ck.provenance
    assert prov["train_config"]["aug"]["p_zoom"] == 0.5 and prov["train_config"]["cross_scale_negatives"] == 1
    assert prov["train_config"]["aug"]["p_defocus"] == 0.3
    # the colour transfer's targets come from the training patches' own colours
    aug = prov["train_config"]["aug"]
    assert aug["p_lab_transfer"] == 0.5 and len(aug["lab_stats"]) == 12 and 20 < aug["lab_stats"][0] < 95
    got = prov["cross_scale_negatives"]
    assert set(got["glomerular_unit"]) >= {"artery", "distal_tubule", "proximal_tubule"}
    assert set(got["distal_tubule"]) >= {"glomerular_unit"} and "peritubular_capillary" not in got
    bad = _cli("train", "--data", demo_dir, "--zoom", "2", "--out", tmp_path / "x.safetensors")
    assert bad.returncode == 2 and "--zoom is a probability" in bad.stderr and not (tmp_path / "x.safetensors").exists()
    bad = _cli("train", "--data", demo_dir, "--lab-transfer", "1.5", "--out", tmp_path / "x.safetensors")
    assert bad.returncode == 2 and "--lab-transfer is a probability" in bad.stderr and not (tmp_path / "x.safetensors").exists()
    bad = _cli("train", "--data", demo_dir, "--defocus", "-0.1", "--out", tmp_path / "x.safetensors")
    assert bad.returncode == 2 and "--defocus is a probability" in bad.stderr and not (tmp_path / "x.safetensors").exists()


def test_segment_with_reader_threads_and_a_write_thread_writes_the_same_labels(files):
    from napari_omniseg.labels.store import LabelStore

    d, ckpt, slide, store = files
    out = d / "threads.ome.zarr"
    r = _cli("segment", slide, "-o", out, "-c", ckpt, "--tissues", "dt", "--tile", "128", "--margin", "16", "-q",
             "--no-skip-background", "--readers", "3", "--write-thread", "on")
    assert r.returncode == 0, r.stderr
    a, b = LabelStore(store), LabelStore(out)
    np.testing.assert_array_equal(a.read("distal_tubule"), b.read("distal_tubule"))
    bad = _cli("segment", slide, "-o", d / "x.ome.zarr", "-c", ckpt, "--readers", "-1", "-q")
    assert bad.returncode != 0 and "--readers" in bad.stderr and "Traceback" not in bad.stderr
