"""One slide spread over a dask LocalCluster: bands of blocks on two workers give the
local run's output bit for bit, and a worker killed mid-run costs nothing but time."""

import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

from napari_omniseg.cli import main
from napari_omniseg.labels.store import MAP_NAME, LabelStore
from napari_omniseg.model import new_checkpoint, save_checkpoint
from napari_omniseg.slides import write_ome_tiff_pyramid
from napari_omniseg.training.data import load_arrays, load_dataset, select

distributed = pytest.importorskip("distributed")

TISSUES = ["dt", "tuft"]  # 10x and 5x
ARGS = ["--tissues", *TISSUES, "--tile", "64", "--margin", "16", "-q", "--threads", "1", "--precision", "fp32"]


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory):
    ck = new_checkpoint(seed=0)
    with torch.no_grad():
        ck.model.controller_weight.normal_(0, 0.5)
    return save_checkpoint(ck.model, tmp_path_factory.mktemp("ck") / "m.safetensors")


@pytest.fixture(scope="module")
def slide(demo_dir, tmp_path_factory):
    """A 1024 x 1536 px OME-TIFF at 0.5 um/px: real 10x demo patches, each shown at 20x."""
    s = load_arrays([x for x in select(load_dataset(demo_dir)) if x.tissue.magnification == 10][:6])
    img = np.full((1024, 1536, 3), 245, np.uint8)
    for k in range(6):
        y0, x0 = (k // 3) * 512, (k % 3) * 512
        img[y0 : y0 + 512, x0 : x0 + 512] = s[k].image[:256, :256].repeat(2, 0).repeat(2, 1)
    p = tmp_path_factory.mktemp("slide") / "kidney.ome.tif"
    write_ome_tiff_pyramid(p, img, mpp=0.5, n_levels=3, tile=256)
    return p


@pytest.fixture(scope="module")
def local(slide, ckpt_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "local.ome.zarr"
    assert main(["segment", str(slide), "-o", str(out), "-c", str(ckpt_path), *ARGS]) == 0
    return LabelStore(out)


def _same(a, b):
    assert b.complete
    for name in ["distal_tubule", "glomerular_tuft", MAP_NAME]:
        for k in range(a.n_levels(name)):
            np.testing.assert_array_equal(a.read(name, k), b.read(name, k), err_msg=f"{name} level {k}")
    for name in ["distal_tubule", "glomerular_tuft"]:  # the review scores too
        np.testing.assert_array_equal(np.asarray(a.root["review"][name][...]), np.asarray(b.root["review"][name][...]))


def _cluster():
    return distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                    silence_logs=50)


def test_one_slide_over_two_workers_is_bit_identical(slide, ckpt_path, local, tmp_path):
    out = tmp_path / "dist.ome.zarr"
    with _cluster() as cl:
        assert main(["segment", str(slide), "-o", str(out), "-c", str(ckpt_path), "--scheduler", cl.scheduler_address,
                     *ARGS]) == 0
    parts = sorted(p.name for p in out.glob("progress-*.json"))
    assert parts == ["progress-0.json", "progress-1.json"]  # one slide, two bands: each wrote its own record
    _same(local, LabelStore(out))


def test_a_worker_killed_mid_run_is_replaced_and_the_output_is_identical(slide, ckpt_path, local, tmp_path):
    from napari_omniseg.inference.cli import engine_config, _segment_args
    from napari_omniseg.inference.distributed import segment_on_cluster
    import argparse
    from dataclasses import asdict

    p = argparse.ArgumentParser()
    _segment_args(p)
    cfg = asdict(engine_config(p.parse_args([str(slide), "-o", "x", *ARGS])))
    out = tmp_path / "killed.ome.zarr"
    with _cluster() as cl, distributed.Client(cl) as client:
        result, errors = {}, []

        def run():
            try:
                result.update(segment_on_cluster(client, str(slide), str(out), str(ckpt_path),
                                                 ["distal_tubule", "glomerular_tuft"], None, cfg, None, parts=2))
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        th = threading.Thread(target=run)
        th.start()
        progress = out / "progress-0.json"
        deadline = time.time() + 120
        while not progress.exists() and time.time() < deadline:
            time.sleep(0.01)
        assert progress.exists(), "part 0 never wrote a block"
        owner = [w for w, keys in client.processing().items() if any("part0" in str(k) for k in keys)]
        assert owner, "part 0 finished before it could be killed; the slide is too small for this test"
        pid = client.run(os.getpid, workers=owner)[owner[0]]
        os.kill(pid, signal.SIGKILL)  # the worker dies mid-run, holding part 0
        th.join(300)
        assert not th.is_alive() and not errors, errors
    rep0 = next(r for r in result["reports"] if r["part"] == 0)
    assert rep0["blocks_resumed"] > 0  # the task run again resumed from the dead worker's record
    _same(local, LabelStore(out))
