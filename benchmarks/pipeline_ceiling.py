"""How many tiles a second the whole-slide pipeline can feed a model: its ceiling.

On a GPU the model is fast and the rest of the pipeline (reading and decoding the
slide, resampling, normalising, blending overlapping tiles, thresholding, review
scores, zarr writes) decides the speed.  No GPU is needed to measure that part:
this script runs ``segment_to_store`` over a whole slide with the model's forward
pass replaced by a copy of real probabilities (one real forward of the shipped model
on a real tile, repeated for every tile, so blending, thresholds and compression
see real data), and prints tiles/s with 1..N reader threads.  The same slide is then
segmented with the real model (``--model-runs``) for end-to-end figures on this
machine, with and without the extra threads.

A GPU that runs the model at M tiles/s can be fed at most min(M, ceiling) tiles/s.

    python benchmarks/pipeline_ceiling.py --size 20480 --readers 1 2 --workdir /tmp/omniseg-wsi
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wsi_throughput import DEMO, build_slide, demo_patches, machine  # noqa: E402

FIVE = ["distal_tubule", "proximal_tubule", "artery", "glomerular_unit", "glomerular_tuft"]


def run(ck, slide, readers: int, free_model: bool, threads: int, writers: int) -> dict:
    from napari_omniseg.inference.engine import EngineConfig, Segmenter, read_tile
    from napari_omniseg.inference.run import segment_to_store
    from napari_omniseg.slides import open_slide

    seg = Segmenter(ck, EngineConfig(device="cpu", threads=threads, readers=readers, writers=writers))
    with open_slide(slide) as src:
        if free_model:
            real = {}
            for p in seg.plans(src, FIVE):  # one real forward per magnification, on a real tile
                ids = tuple(t.id for t in p.tissues)
                t = p.tiles[len(p.tiles) // 2]
                real[ids] = seg.predict_tiles(read_tile(src, p, *t)[None], list(ids))[0]

            def predict_tiles(tiles, tissue_ids, stat_masks=None):
                return np.repeat(real[tuple(tissue_ids)][None], len(tiles), axis=0)

            seg.predict_tiles = predict_tiles
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            _, rep = segment_to_store(seg, src, Path(d) / "out.ome.zarr", FIVE)
            dt = time.perf_counter() - t0
    return {"readers": readers, "writers": writers, "free_model": free_model, "seconds": round(dt, 2),
            "tiles": rep.tiles_run, "skipped": rep.tiles_skipped, "tiles_per_s": round(rep.tiles_run / dt, 2),
            "engine_s": round(rep.seconds, 2), "engine_tiles_per_s": round(rep.tiles_run / rep.seconds, 2),
            "model_s": round(rep.model_seconds, 2), "read_s": round(rep.read_seconds, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEMO))
    ap.add_argument("--size", type=int, default=20480, help="slide side at 40x (px)")
    ap.add_argument("--workdir", default="/tmp/omniseg-wsi")
    ap.add_argument("--readers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--writers", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--model-runs", nargs="*", default=["1,0", "2,1"], metavar="R,W",
                    help="end-to-end runs with the real model, as readers,writers pairs (none: skip)")
    ap.add_argument("--json")
    a = ap.parse_args(argv)

    from napari_omniseg.model import load_checkpoint, resolve_checkpoint

    ck = load_checkpoint(resolve_checkpoint(None))
    wd = Path(a.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    slide = build_slide(wd / f"renal-{a.size}.ome.tif", a.size, demo_patches(Path(a.data)))
    print(machine())
    rows = []
    for w in a.writers:
        for r in a.readers:
            rows.append(run(ck, slide, r, True, a.threads, w))
            print(json.dumps(rows[-1]), flush=True)
    for rw in a.model_runs:
        r, w = (int(v) for v in rw.split(","))
        rows.append(run(ck, slide, r, False, a.threads, w))
        print(json.dumps(rows[-1]), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": machine(), "size": a.size, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
