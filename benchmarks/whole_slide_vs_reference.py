"""A whole mosaic slide with glass: our plan vs a reference-style plan, all six tissues.

Writes a pyramidal 40x OME-TIFF (0.25 um/px, JPEG tiles) laid out like a biopsy
slide: a band of real renal-demo 10x patches (each upsampled into a 1024 px cell,
one cell in five left as glass) across the middle ``--tissue-fraction`` of the rows,
off-white glass everywhere else. Then, in one run:

- ours: ``segment_to_store`` of all six tissues over the whole slide (tissue mask,
  one backbone pass per tile shared by the tissues of a magnification, 576 px tiles
  with 32 px margins), wall clock measured;
- reference-style: 512 px windows at stride 64 over the whole slide at each tissue's
  magnification, one full network run per tissue per window, no background
  skipping. Its time is the exact number of window forwards times the seconds per
  window forward, measured here on 512 px windows of this slide in the same
  precision as ours (and in fp32, the reference's own precision).

    python benchmarks/whole_slide_vs_reference.py --size 16384 --workdir /tmp/omniseg-wsi
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wsi_throughput import CELL, DEMO, _cell, build_slide, demo_patches, machine  # noqa: E402

GLASS = (236, 234, 239)


def window_seconds(seg, src, precision: str, n: int = 4, reps: int = 2) -> float:
    """Seconds per 512 px window forward of the full network (one tissue), batch of n."""
    from napari_omniseg.inference.precision import autocast, resolve_precision

    H0, W0 = src.shapes[0]
    y = H0 // 2
    sample = np.stack([src.read_at_mpp(1.0, y, W0 // 4 + 256 * i, 512, 512) for i in range(n)])
    x = seg.ckpt.normalize(torch.from_numpy(sample).permute(0, 3, 1, 2)).to(seg.device)
    prec = resolve_precision(precision, seg.device)
    with torch.inference_mode(), autocast(prec, seg.device):
        seg.model(x, [0] * n)
        t0 = time.perf_counter()
        for _ in range(reps):
            seg.model(x, [0] * n)
    return (time.perf_counter() - t0) / (reps * n)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEMO))
    ap.add_argument("--size", type=int, default=16384, help="slide side at 40x (px)")
    ap.add_argument("--tissue-fraction", type=float, default=0.4, help="share of the cell rows that hold tissue")
    ap.add_argument("--workdir", default="/tmp/omniseg-wsi")
    ap.add_argument("--device", default="auto")
    a = ap.parse_args(argv)
    from napari_omniseg.inference.engine import EngineConfig, Segmenter
    from napari_omniseg.inference.run import segment_to_store
    from napari_omniseg.model import load_checkpoint, resolve_checkpoint
    from napari_omniseg.slides import open_slide
    from napari_omniseg.tissues import TISSUES

    n = a.size // CELL
    r0 = int(round(n * (1 - a.tissue_fraction) / 2))
    r1 = r0 + max(1, int(round(n * a.tissue_fraction)))

    def cell(patches, ci, cj):
        return _cell(patches, ci, cj) if r0 <= ci < r1 else None

    wd = Path(a.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    slide = build_slide(wd / f"biopsy-{a.size}-{a.tissue_fraction:g}.ome.tif", a.size, demo_patches(Path(a.data)),
                        cell=cell, background=GLASS)
    ck = load_checkpoint(resolve_checkpoint(None))
    seg = Segmenter(ck, EngineConfig(device=a.device))
    res: dict = {"machine": machine(), "slide": f"{a.size} x {a.size} px at 40x, tissue in rows {r0}-{r1 - 1} of {n} cells",
                 "precision": seg.precision, "batch_size": seg.batch_size}
    with open_slide(slide) as src:
        out = wd / f"biopsy-run-{time.time_ns()}.ome.zarr"
        t0 = time.perf_counter()
        _, rep = segment_to_store(seg, src, out, None)
        ours = time.perf_counter() - t0
        res["ours"] = {"seconds": ours, "tiles_run": rep.tiles_run, "tiles_skipped": rep.tiles_skipped,
                       "glass_share_of_tiles": rep.tiles_skipped / max(1, rep.tiles_run + rep.tiles_skipped)}
        print("ours", json.dumps(res["ours"]), flush=True)
        windows = {}
        for t in TISSUES:
            f = t.mpp / float(src.mpp)
            side = int(a.size / f)
            k = max(1, (max(side, 512) - 512) // 64 + 1)
            windows[t.name] = k * k
        res["reference_window_forwards"] = windows
        total = sum(windows.values())
        for prec in sorted({seg.precision, "fp32"}):
            s = window_seconds(seg, src, prec)
            res[f"reference_{prec}"] = {"s_per_window": s, "seconds": total * s, "speedup": total * s / ours}
            print(f"reference in {prec}: {total} window forwards x {s:.3f} s = {total * s:.0f} s -> "
                  f"{total * s / ours:.0f}x", flush=True)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
