"""Precision chosen by hardware, bf16 masks that agree with fp32 on real kidney patches,
and short batches that run unpadded without changing a single output pixel."""

import numpy as np
import pytest
import torch

from napari_omniseg.inference import precision as P
from napari_omniseg.inference.engine import EngineConfig, Segmenter, segment_region
from napari_omniseg.slides import ImageSlide


def test_auto_precision_follows_the_cpu(monkeypatch):
    monkeypatch.setattr(P, "cpu_has_fast_bf16", lambda: True)
    assert P.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(P, "cpu_has_fast_bf16", lambda: False)
    assert P.resolve_precision("auto", "cpu") == "fp32"
    assert P.resolve_precision("bf16", "cpu") == "bf16"  # forced: allowed, only slower
    assert P.resolve_precision("fp32", "cpu") == "fp32"
    with pytest.raises(ValueError, match="fp16 runs only on CUDA"):
        P.resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="unknown precision"):
        P.resolve_precision("int8", "cpu")
    d = P.describe("cpu", "auto", threads=3)
    assert d == {"device": "cpu", "precision": "fp32", "threads": 3, "cpu_fast_bf16": False,
                 "cpu_cores": d["cpu_cores"]}


def test_auto_precision_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert P.resolve_precision("auto", "cuda") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert P.resolve_precision("auto", "cuda") == "fp16"
    assert P.resolve_precision("fp16", "cuda") == "fp16"


def test_the_engine_uses_the_resolved_precision_and_cpu_batch_of_one(monkeypatch):
    from napari_omniseg.model import new_checkpoint

    ck = new_checkpoint(seed=0)
    monkeypatch.setattr(P, "cpu_has_fast_bf16", lambda: False)
    seg = Segmenter(ck, EngineConfig(device="cpu"))
    assert seg.precision == "fp32" and seg.batch_size == 1
    seg = Segmenter(ck, EngineConfig(device="cpu", precision="bf16", batch_size=5))
    assert seg.precision == "bf16" and seg.batch_size == 5
    with seg._autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_info_reports_precision_and_threads(tmp_path):
    import json
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "napari_omniseg", "info", "--json", "--device", "cpu",
                        "--precision", "fp32", "--threads", "2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rt = json.loads(r.stdout)["runtime"]
    assert rt["device"] == "cpu" and rt["precision"] == "fp32" and rt["threads"] == 2
    r = subprocess.run([sys.executable, "-m", "napari_omniseg", "info", "--device", "cpu", "--precision", "fp16"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "fp16 runs only on CUDA" in r.stderr


def test_bf16_masks_agree_with_fp32_on_real_patches():
    """The shipped model on two real patches per tissue: bf16 and fp32 masks agree to
    Dice >= 0.95 and >= 98 % of pixels on every patch, and the Dice against the
    pathologist's mask moves by at most 0.02.  Measured with 2 threads: with the step-5
    model on a CPU with AVX-512 bf16 over all 23 bundled patches Dice >= 0.981, pixels
    >= 99.4 %; on an AVX2-only CPU (bf16 emulated) the lowest was 0.957 (a capillary
    patch; 1 thread there gives other bits), so the thread count is set here, not left
    to test order.  The step-6 model cuts the distal tubule at 0.10, where many of its
    pixels lie: one distal-tubule patch agrees to Dice 0.974 and 98.96 % of pixels."""
    from napari_omniseg.demo import bundled_samples
    from napari_omniseg.model.checkpoint import load_checkpoint
    from napari_omniseg.model.registry import shipped_checkpoint

    ck = load_checkpoint(shipped_checkpoint())
    picked, seen = [], {}
    for s in bundled_samples():
        if seen.get(s.tissue.name, 0) < 2:
            seen[s.tissue.name] = seen.get(s.tissue.name, 0) + 1
            picked.append(s)
    assert len(picked) == 12
    masks = {}
    before = torch.get_num_threads()
    try:
        for prec in ("fp32", "bf16"):
            seg = Segmenter(ck, EngineConfig(core=256, margin=32, precision=prec, skip_background=False, device="cpu",
                                             threads=2))
            masks[prec] = [segment_region(seg, ImageSlide(s.image, mpp=s.tissue.mpp), None, [s.tissue.name])[0]
                           [s.tissue.name].data == 1 for s in picked]
    finally:
        torch.set_num_threads(before)

    def dice(a, b):
        d = a.sum() + b.sum()
        return 1.0 if d == 0 else 2 * (a & b).sum() / d

    for s, a, b in zip(picked, masks["fp32"], masks["bf16"]):
        assert a.any(), s.tissue.name  # the model finds something: the comparison means something
        assert dice(a, b) >= 0.95 and (a == b).mean() >= 0.98, (s.tissue.name, dice(a, b), (a == b).mean())
        truth = s.mask[: a.shape[0], : a.shape[1]].astype(bool)
        assert abs(dice(a, truth) - dice(b, truth)) <= 0.02, s.tissue.name


@pytest.fixture(scope="module")
def mosaic(demo_dir):
    from napari_omniseg.training.data import load_arrays, load_dataset, select

    s = load_arrays([x for x in select(load_dataset(demo_dir), "test") if x.tissue.magnification == 10][:4])
    img = np.full((300, 420, 3), 245, np.uint8)
    for k, x in enumerate(s):
        y0, x0 = 20 + (k // 2) * 130, 20 + (k % 2) * 200
        img[y0 : y0 + 128, x0 : x0 + 180] = x.image[:128, :180]
    return ImageSlide(img, mpp=0.5)


@pytest.fixture(scope="module")
def rand_ckpt():
    from napari_omniseg.model import new_checkpoint
    from napari_omniseg.model.network import NetConfig
    from napari_omniseg.tissues import TISSUES

    cfg = NetConfig(tissue_scales=tuple(t.scale_id for t in TISSUES), pool_norm="none", controller_init="uniform")
    ck = new_checkpoint(cfg=cfg, seed=0)
    with torch.no_grad():
        ck.model.controller_weight.normal_(0, 0.5)
    return ck


def _counting(seg):
    calls = []
    orig = seg.model.features

    def counting(x):
        calls.append(x.shape[0])
        return orig(x)

    seg.model.features = counting
    return calls


TISSUES = ["distal_tubule", "proximal_tubule", "glomerular_unit"]


def test_one_tile_batches_run_every_tile_once_and_region_equals_whole(mosaic, rand_ckpt):
    seg = Segmenter(rand_ckpt, EngineConfig(core=64, margin=16, skip_background=False, device="cpu", precision="fp32"))
    assert seg.batch_size == 1
    calls = _counting(seg)
    whole, rep = segment_region(seg, mosaic, None, TISSUES)
    n_tiles = sum(len(p.tiles) for p in seg.plans(mosaic, TISSUES))
    assert rep.tiles_run == n_tiles and sum(calls) == n_tiles and set(calls) == {1}  # nothing padded
    region = (90, 50, 200, 180)
    part, _ = segment_region(seg, mosaic, region, TISSUES)
    for name in TISSUES:
        y0, x0 = part[name].origin
        h, w = part[name].data.shape
        np.testing.assert_array_equal(part[name].data, whole[name].data[y0 : y0 + h, x0 : x0 + w], err_msg=name)


@pytest.mark.parametrize("invariant", [True, False])
def test_short_batches_are_unpadded_only_where_the_device_gives_the_same_bits(mosaic, rand_ckpt, invariant,
                                                                               monkeypatch):
    """Batches of 5 on two kinds of device: one whose kernels give every tile the same
    bits whatever the batch shape, and one whose short batches drift. Region == whole
    slide on both; the first runs its short batches unpadded, the second pads them and
    gives exactly the always-padded result."""
    cfg = EngineConfig(core=64, margin=16, batch_size=5, skip_background=False, device="cpu", precision="fp32")
    seg, ref = Segmenter(rand_ckpt, cfg), Segmenter(rand_ckpt, cfg)
    ref._predict_batch = lambda x, ids: ref._predict_safely(  # the old rule: always pad to 5
        np.concatenate([x, np.zeros((5 - len(x), *x.shape[1:]), x.dtype)]) if len(x) < 5 else x, ids)[: len(x)]
    orig = seg.predict_tiles
    if invariant:  # tile by tile: the result cannot depend on the batch
        fake = lambda x, ids: np.concatenate([orig(x[i : i + 1], ids) for i in range(len(x))])  # noqa: E731
    else:  # kernels that change with the batch shape: short batches drift
        fake = lambda x, ids: (lambda p: p if len(x) == 5 else np.clip(p + 0.3 * (p > 0.4), 0, 1))(orig(x, ids))  # noqa: E731
    calls = []
    monkeypatch.setattr(seg, "predict_tiles", lambda x, ids: calls.append(len(x)) or fake(x, ids))
    whole, _ = segment_region(seg, mosaic, None, TISSUES)
    if not invariant:
        whole_ref, _ = segment_region(ref, mosaic, None, TISSUES)
        for name in TISSUES:
            np.testing.assert_array_equal(whole[name].data, whole_ref[name].data, err_msg=name)
    region = (90, 50, 200, 180)
    for _ in range(2):  # the second time every short size has been probed already
        calls.clear()
        part, rep = segment_region(seg, mosaic, region, TISSUES)
        for name in TISSUES:
            y0, x0 = part[name].origin
            h, w = part[name].data.shape
            np.testing.assert_array_equal(part[name].data, whole[name].data[y0 : y0 + h, x0 : x0 + w], err_msg=name)
    assert seg._invariant and all(v is invariant for v in seg._invariant.values())
    sizes = sorted(calls)
    assert sum(sizes) >= rep.tiles_run
    if invariant:
        assert sum(sizes) == rep.tiles_run and min(sizes) < 5  # short batches ran unpadded
    else:
        assert set(sizes) == {5} and sum(sizes) > rep.tiles_run  # short batches padded
