"""GPU throughput, in one prepared run (about 10 minutes on one GPU).

(a) the bare model in bf16 (and fp32 for the ratio): tiles/s of 576 px tiles, three
    10x tissues, at batch 16, 32 and 64, with peak GPU memory per batch size;
(b) end to end from a pyramidal OME-TIFF on local disk (``segment_to_store``, five
    5x/10x tissues, batch 16 and 32): tiles/s, pipeline efficiency against (a), peak
    GPU memory.

    python benchmarks/gpu_throughput.py --size 20480 --workdir /tmp/omniseg-gpu

Refuses to run without CUDA (the CPU figures come from ``precision_batching.py``).
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEMO))
    ap.add_argument("--size", type=int, default=20480)
    ap.add_argument("--workdir", default="/tmp/omniseg-gpu")
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--reps", type=int, default=10)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: this script measures the GPU path only", file=sys.stderr)
        return 2
    from napari_omniseg.inference.engine import EngineConfig, Segmenter
    from napari_omniseg.inference.run import segment_to_store
    from napari_omniseg.model import load_checkpoint, resolve_checkpoint
    from napari_omniseg.slides import open_slide

    ck = load_checkpoint(resolve_checkpoint(None))
    res: dict = {"machine": machine()}
    rng = np.random.default_rng(0)
    patches = demo_patches(Path(a.data))
    base = np.stack([np.pad(patches[i % len(patches)], ((160, 160), (160, 160), (0, 0)), mode="reflect")
                     for i in range(max(a.batches))])
    for prec in ("bf16", "fp32"):
        seg = Segmenter(ck, EngineConfig(device="cuda", precision=prec))
        for bs in a.batches:
            x = base[rng.permutation(len(base))[:bs]]
            seg.predict_tiles(x, [0, 1, 4])
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for _ in range(a.reps):
                seg.predict_tiles(x, [0, 1, 4])
            torch.cuda.synchronize()
            tps = a.reps * bs / (time.perf_counter() - t0)
            res[f"model_{prec}_b{bs}"] = {"tiles_per_s": tps, "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20}
            print(prec, bs, json.dumps(res[f"model_{prec}_b{bs}"]), flush=True)
    wd = Path(a.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    slide = build_slide(wd / f"slide-{a.size}.ome.tif", a.size, patches)
    tmp = Path(tempfile.mkdtemp(dir=wd))
    for bs in (16, 32):
        seg = Segmenter(ck, EngineConfig(device="cuda", precision="auto", batch_size=bs, prefetch=4))
        torch.cuda.reset_peak_memory_stats()
        with open_slide(slide) as src:
            t0 = time.perf_counter()
            _, rep = segment_to_store(seg, src, tmp / f"e2e-{bs}.ome.zarr", FIVE)
            dt = time.perf_counter() - t0
        r = {"seconds": dt, "tiles": rep.tiles_run, "skipped": rep.tiles_skipped, "tiles_per_s": rep.tiles_run / dt,
             "model_seconds": rep.model_seconds, "read_seconds": rep.read_seconds,
             "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20, "precision": seg.precision}
        bare = res.get(f"model_bf16_b{bs}", {}).get("tiles_per_s")
        if bare:
            r["efficiency_vs_bare_3_tissues"] = r["tiles_per_s"] / bare
        res[f"end_to_end_b{bs}"] = r
        print("end to end", bs, json.dumps(r), flush=True)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
