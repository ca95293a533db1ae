"""One slide on a dask LocalCluster of N single-threaded workers vs one process.

Builds (or reuses) the pyramidal 40x OME-TIFF of real renal-demo patches that
``wsi_throughput.py`` writes, then times ``omniseg segment`` as a user runs it, each
in a fresh subprocess with the shipped model and the auto precision:

- one process, torch on all cores (``--threads 0``);
- one process, one torch thread;
- ``--scheduler`` on a LocalCluster of ``--workers`` processes with one thread each
  (the cluster is started before the clock starts; loading the model in every task
  is counted); the slide is split into one band of block rows per worker.

It checks that the cluster's labels equal the local run's at every level, and prints
the wall-clock ratios.  The bands overlap by one row of tiles (blending needs each
block's neighbours), so with ``r`` block rows per band at a magnification the best
possible ratio on 2 workers is ``2 r / (r + 1)``; the script prints that bound too.

    python benchmarks/cluster_scaling.py --size 20480 --workers 2 --workdir /tmp/omniseg-wsi
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wsi_throughput import DEMO, build_slide, demo_patches, machine  # noqa: E402

FIVE = ["distal_tubule", "proximal_tubule", "artery", "glomerular_unit", "glomerular_tuft"]


def _segment(slide: Path, out: Path, *extra: str) -> float:
    cmd = [sys.executable, "-m", "napari_omniseg", "segment", str(slide), "-o", str(out), "--tissues", *FIVE,
           "-q", "-y", *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEMO))
    ap.add_argument("--size", type=int, default=20480, help="slide side at 40x (px)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/omniseg-wsi")
    a = ap.parse_args(argv)
    from distributed import LocalCluster

    from napari_omniseg.labels.store import LabelStore

    wd = Path(a.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    slide = build_slide(wd / f"slide-{a.size}.ome.tif", a.size, demo_patches(Path(a.data)))
    run = wd / f"cluster-{time.time_ns()}"
    res: dict = {"machine": machine(), "slide": f"{a.size} x {a.size} px at 40x, five 5x/10x tissues",
                 "workers": a.workers}
    res["one_process_all_threads_s"] = _segment(slide, run / "local.ome.zarr")
    print(f"one process, all threads: {res['one_process_all_threads_s']:.1f} s", flush=True)
    res["one_process_one_thread_s"] = _segment(slide, run / "local1.ome.zarr", "--threads", "1")
    print(f"one process, one thread: {res['one_process_one_thread_s']:.1f} s", flush=True)
    with LocalCluster(n_workers=a.workers, threads_per_worker=1, processes=True, dashboard_address=None) as cl:
        res["cluster_s"] = _segment(slide, run / "cluster.ome.zarr", "--scheduler", cl.scheduler_address,
                                    "--threads", "1")
    print(f"LocalCluster, {a.workers} workers x 1 thread: {res['cluster_s']:.1f} s", flush=True)
    # the workers run one torch thread each; bf16 sums depend on the thread count, so the
    # reference is the one-thread local run
    ref, got = LabelStore(run / "local1.ome.zarr"), LabelStore(run / "cluster.ome.zarr")
    same = all(np.array_equal(ref.read(n, k), got.read(n, k)) for n in ref.label_names() for k in range(ref.n_levels(n)))
    res["identical_to_local"] = bool(same)
    res["vs_one_process_all_threads"] = res["one_process_all_threads_s"] / res["cluster_s"]
    res["vs_one_process_one_thread"] = res["one_process_one_thread_s"] / res["cluster_s"]
    rows = {10: math.ceil(a.size / 4 / 512), 5: math.ceil(a.size / 8 / 512)}  # block rows per magnification
    res["block_rows"] = rows
    r = rows[10] / a.workers
    res["halo_bound_10x"] = a.workers * r / (r + 1)
    print(json.dumps(res, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
