"""Precision and batching, measured end to end in one run.

Builds (or reuses) a pyramidal 40x OME-TIFF of real renal-demo patches (see
``wsi_throughput.py``), then times, with the shipped model:

(a) the whole slide, five 5x/10x tissues, fp32 vs bf16 (``segment_to_store``:
    reading, resampling, model, blending, zarr writes), and the bare model's
    tiles/s on the same tiles, so the pipeline efficiency of each is known;
(b) batch of one tile (the CPU default, never padded) vs the former fixed batch of 4
    padded to full size, on the same slide, in the auto precision;
(c) a single 512 px image through the engine: batch auto vs a padded batch of 4;
(d) one field of view of 2,048 x 2,048 px at 40x, five tissues at 5x/10x, with the
    segment widget's settings (256 px blocks, 32 px margin), auto precision.

    python benchmarks/precision_batching.py --size 6144 --workdir /tmp/omniseg-wsi
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wsi_throughput import DEMO, build_slide, demo_patches, machine  # noqa: E402

FIVE = ["distal_tubule", "proximal_tubule", "artery", "glomerular_unit", "glomerular_tuft"]


def _ck():
    from napari_omniseg.model import load_checkpoint, resolve_checkpoint

    return load_checkpoint(resolve_checkpoint(None))


def _seg(ck, **kw):
    from napari_omniseg.inference.engine import EngineConfig, Segmenter

    return Segmenter(ck, EngineConfig(**kw))


def end_to_end(ck, slide, out, **kw) -> dict:
    from napari_omniseg.inference.run import segment_to_store
    from napari_omniseg.slides import open_slide

    seg = _seg(ck, **kw)
    with open_slide(slide) as src:
        t0 = time.perf_counter()
        _, rep = segment_to_store(seg, src, out, FIVE)
        dt = time.perf_counter() - t0
    return {"seconds": dt, "tiles": rep.tiles_run, "skipped": rep.tiles_skipped, "tiles_per_s": rep.tiles_run / dt,
            "precision": seg.precision, "batch": seg.batch_size}


def bare_model(ck, slide, **kw) -> float:
    """Tiles/s of the model alone on the slide's tiles (already read), the same tissues."""
    from napari_omniseg.inference.engine import read_tile
    from napari_omniseg.slides import open_slide

    seg = _seg(ck, **kw)
    n, secs = 0, 0.0
    with open_slide(slide) as src:
        mask = seg.tissue_mask(src)
        for p in seg.plans(src, FIVE):
            tiles = [read_tile(src, p, *t) for t in p.tiles if seg._has_tissue(mask, p, t, src.mpp)]
            ids = [t.id for t in p.tissues]
            seg.predict_tiles(np.stack(tiles[:1]), ids)  # warm-up
            t0 = time.perf_counter()
            for i in range(0, len(tiles), seg.batch_size):
                seg._predict_batch(np.stack(tiles[i : i + seg.batch_size]), ids)
            secs += time.perf_counter() - t0
            n += len(tiles)
    return n / secs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEMO))
    ap.add_argument("--size", type=int, default=6144, help="slide side at 40x (px)")
    ap.add_argument("--workdir", default="/tmp/omniseg-wsi")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--skip", nargs="*", default=[], help="parts to skip: a b c d")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    wd = Path(a.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    slide = build_slide(wd / f"slide-{a.size}.ome.tif", a.size, demo_patches(Path(a.data)))
    ck = _ck()
    res: dict = {"machine": machine(), "slide": f"{a.size} x {a.size} px at 40x, five 5x/10x tissues"}
    tmp = Path(tempfile.mkdtemp(dir=wd))
    base = dict(device=a.device)
    if "a" not in a.skip:
        for prec in ("fp32", "bf16"):
            r = end_to_end(ck, slide, tmp / f"a-{prec}.ome.zarr", precision=prec, **base)
            r["bare_tiles_per_s"] = bare_model(ck, slide, precision=prec, **base)
            r["efficiency"] = r["tiles_per_s"] / r["bare_tiles_per_s"]
            res[f"a_{prec}"] = r
            print(prec, json.dumps(r), flush=True)
        res["a_bf16_over_fp32"] = res["a_fp32"]["seconds"] / res["a_bf16"]["seconds"]
        print(f"(a) bf16 vs fp32 end to end: {res['a_bf16_over_fp32']:.2f}x", flush=True)
    if "b" not in a.skip:
        r1 = end_to_end(ck, slide, tmp / "b-1.ome.zarr", **base)
        seg4 = dict(batch_size=4, **base)
        r4 = end_to_end(ck, slide, tmp / "b-4.ome.zarr", **seg4)
        res["b_batch1"], res["b_batch4"] = r1, r4
        res["b_ratio"] = r4["seconds"] / r1["seconds"]
        print(f"(b) batch 1 vs batch 4: {r1['seconds']:.1f} s vs {r4['seconds']:.1f} s = {res['b_ratio']:.2f}x", flush=True)
    if "c" not in a.skip:
        from napari_omniseg.inference.engine import segment_region
        from napari_omniseg.slides import ImageSlide

        img = ImageSlide(demo_patches(Path(a.data))[0][:256, :256].repeat(2, 0).repeat(2, 1), mpp=0.5)
        times = {}
        for name, kw in (("auto", {}), ("padded4", {"batch_size": 4})):
            seg = _seg(ck, core=512, margin=32, skip_background=False, **kw, **base)
            if name == "padded4":  # the former rule: every batch padded to 4 tiles
                seg._invariant = {}
                seg._predict_batch = lambda x, ids, sm=None, s=seg: s._predict_safely(
                    np.concatenate([x, np.zeros((4 - len(x), *x.shape[1:]), x.dtype)]) if len(x) < 4 else x, ids,
                    None if sm is None else list(sm) + [None] * (4 - len(x)))[: len(x)]
            segment_region(seg, img, None, ["distal_tubule"])  # warm-up
            t0 = time.perf_counter()
            segment_region(seg, img, None, ["distal_tubule"])
            times[name] = time.perf_counter() - t0
        res["c_one_tile"] = times
        print(f"(c) one 512 px image: auto {times['auto']:.2f} s vs padded batch of 4 {times['padded4']:.2f} s", flush=True)
    if "d" not in a.skip:
        from napari_omniseg.inference.engine import segment_region
        from napari_omniseg.slides import open_slide

        seg = _seg(ck, core=256, margin=32, **base)
        with open_slide(slide) as src:
            c = a.size // 2 - 1024
            segment_region(seg, src, (c, c, 2048, 2048), FIVE)  # warm-up (and the tissue mask)
            t0 = time.perf_counter()
            _, rep = segment_region(seg, src, (c, c, 2048, 2048), FIVE)
            dt = time.perf_counter() - t0
        res["d_fov"] = {"seconds": dt, "tiles": rep.tiles_run, "precision": seg.precision}
        print(f"(d) 2048 px field of view, five tissues: {dt:.2f} s ({rep.tiles_run} tiles, {seg.precision})", flush=True)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
