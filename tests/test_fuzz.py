"""A seeded fuzz suite over what users hand the CLI: checkpoint sidecars, manifests,
label stores and slide files, mutated at random.  Every input must end in success
(rc 0) or one line ``error: ...`` (rc 2); no exception may escape and no traceback
may be printed.  The seed is fixed, so a failure is reproducible from its case id."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch

from napari_omniseg.cli import main
from napari_omniseg.model import new_checkpoint, save_checkpoint
from napari_omniseg.slides import write_ome_tiff_pyramid

N = 16  # cases per target


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    import imageio.v3 as iio

    d = tmp_path_factory.mktemp("fuzz")
    ck = new_checkpoint(seed=0)
    with torch.no_grad():
        ck.model.controller_weight.normal_(0, 0.5)
    ckpt = save_checkpoint(ck.model, d / "m.safetensors")
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (192, 192, 3), dtype=np.uint8)
    slide = d / "s.ome.tif"
    write_ome_tiff_pyramid(slide, img, mpp=1.0, n_levels=2, tile=64)
    store = d / "s.ome.zarr"
    assert main(["segment", str(slide), "-o", str(store), "-c", str(ckpt), "--tissues", "dt", "--tile", "64",
                 "--margin", "16", "-q", "--no-skip-background"]) == 0
    data = d / "data"
    (data / "images").mkdir(parents=True)
    for k in range(2):
        iio.imwrite(data / "images" / f"p{k}.png", img[:64, :64])
        iio.imwrite(data / "images" / f"p{k}_mask.png", ((img[:64, :64, 0] > 128) * 255).astype(np.uint8))
    (data / "manifest.csv").write_text("image_path,label_path,tissue,split\n"
                                       "images/p0.png,images/p0_mask.png,distal_tubule,test\n"
                                       "images/p1.png,images/p1_mask.png,distal_tubule,test\n")
    return d, ckpt, slide, store, data


def _run(args, capsys):
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:  # argparse
        rc = e.code
    out = capsys.readouterr()
    assert "Traceback" not in out.err, out.err
    assert rc in (0, 2), (rc, out.err)
    if rc == 2:
        assert out.err.strip().splitlines()[-1].startswith("error: "), out.err
    return rc


def _mutate_json(obj, r: random.Random, depth=0):
    """One random edit somewhere in a JSON value."""
    junk = [None, -1, 0, 1e308, float("nan") if r.random() < 0.1 else 3, "abc", "../x", [], {}, [1, 2], {"a": 1},
            True, 200000, -200000]
    if isinstance(obj, dict) and obj and r.random() < 0.85:
        k = r.choice(sorted(obj))
        roll = r.random()
        if roll < 0.25:
            del obj[k]
        elif roll < 0.55 or depth > 3:
            obj[k] = r.choice(junk)
        else:
            obj[k] = _mutate_json(obj[k], r, depth + 1)
        return obj
    if isinstance(obj, list) and obj and r.random() < 0.85:
        i = r.randrange(len(obj))
        obj[i] = r.choice(junk) if r.random() < 0.6 else _mutate_json(obj[i], r, depth + 1)
        return obj
    return r.choice(junk)


@pytest.mark.parametrize("case", range(N))
def test_fuzz_checkpoint_sidecar(base, tmp_path, capsys, case):
    d, ckpt, slide, _store, _data = base
    r = random.Random(1000 + case)
    side = json.loads(ckpt.with_suffix(".json").read_text())
    for _ in range(r.randint(1, 3)):
        side = _mutate_json(side, r)
    p = tmp_path / "f.safetensors"
    shutil.copy(ckpt, p)
    p.with_suffix(".json").write_text(json.dumps(side))
    _run(["info", "-c", p], capsys)


@pytest.mark.parametrize("case", range(N))
def test_fuzz_manifest(base, tmp_path, capsys, case):
    d, ckpt, _slide, _store, data = base
    r = random.Random(2000 + case)
    raw = bytearray((data / "manifest.csv").read_bytes())
    for _ in range(r.randint(1, 4)):
        op = r.random()
        i = r.randrange(len(raw))
        if op < 0.3:
            raw[i] = r.randrange(256)
        elif op < 0.5:
            raw[i:i] = r.choice([b",", b'"', b"\n", b"\x00", b"\xff\xfe", b"../", b",,,,"])
        elif op < 0.7:
            del raw[i : i + r.randint(1, 12)]
        else:
            raw = raw[:i]
    m = tmp_path / "data"
    shutil.copytree(data, m)
    (m / "manifest.csv").write_bytes(bytes(raw))
    _run(["evaluate", "-c", ckpt, "--data", m / "manifest.csv", "--split", "all"], capsys)


@pytest.mark.parametrize("case", range(N))
def test_fuzz_label_store(base, tmp_path, capsys, case):
    d, _ckpt, _slide, store, _data = base
    r = random.Random(3000 + case)
    s = tmp_path / "s.ome.zarr"
    shutil.copytree(store, s)
    metas = sorted(p for p in s.rglob("zarr.json"))
    target = r.choice(metas)
    if r.random() < 0.3:  # raw bytes
        raw = bytearray(target.read_bytes())
        i = r.randrange(len(raw))
        target.write_bytes(bytes(raw[:i]) + (b"\x00" if r.random() < 0.5 else b"}"))
    else:
        obj = json.loads(target.read_text())
        for _ in range(r.randint(1, 3)):
            obj = _mutate_json(obj, r)
        target.write_text(json.dumps(obj))
    _run(["export", s, "--measurements", tmp_path / "m.csv"], capsys)
    if (s / "review").exists():
        _run(["suggest", s, "-n", "3"], capsys)


@pytest.mark.parametrize("case", range(N))
def test_fuzz_slide_file(base, tmp_path, capsys, case):
    d, ckpt, slide, _store, _data = base
    r = random.Random(4000 + case)
    raw = bytearray(slide.read_bytes())
    for _ in range(r.randint(1, 6)):
        i = r.randrange(len(raw))
        n = r.choice([1, 4, 16, 256])
        raw[i : i + n] = bytes(r.randrange(256) for _ in range(min(n, len(raw) - i)))
    if r.random() < 0.2:
        raw = raw[: r.randrange(len(raw))]
    p = tmp_path / "f.ome.tif"
    p.write_bytes(bytes(raw))
    _run(["segment", p, "-o", tmp_path / "o.ome.zarr", "-c", ckpt, "--tissues", "dt", "--tile", "64", "--margin", "16",
          "-q", "--no-skip-background"], capsys)
