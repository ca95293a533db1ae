"""How responsive napari stays while the plugin segments and fine-tunes in the background.

A QTimer fires every 10 ms on the Qt main thread and records how late each tick
is (time since the previous tick minus 10 ms).  Meanwhile the camera pans a little
every 100 ms, so the canvas keeps redrawing as it would while a user looks around.
Three phases are measured: idle, a segmentation of a region of the renal sample
running in a ``thread_worker`` (the Segment widget, default settings), and a
fine-tune on the exported corrections of that region (the Fine-tune widget, CPU
defaults).  Prints p50 / p95 / max lateness in ms per phase.

    OMP_NUM_THREADS=2 xvfb-run -a python benchmarks/viewer_latency.py [--region 512] [--epochs 2]

Uses the active (or shipped) checkpoint; without one, a randomly initialised model
of the same architecture (same compute per tile, so the timings hold).  Runs in a
temporary OMNISEG_HOME, so the user's models and projects are not touched.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def _percentiles(lat_ms):
    import numpy as np

    a = np.asarray(lat_ms, float)
    if a.size == 0:
        return {"n": 0}
    return {"n": int(a.size), "p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "max": float(a.max())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--region", type=int, default=512, help="side of the square region segmented (level-0 px)")
    ap.add_argument("--tissues", default="distal_tubule,proximal_tubule,artery")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--idle", type=float, default=3.0, help="seconds of idle baseline")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads for the background work (0 = the widgets' default)")
    ap.add_argument("--no-pan", action="store_true", help="do not pan the camera during the measurements")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    a = ap.parse_args(argv)

    shipped = None
    try:
        from napari_omniseg.model.registry import ModelRegistry as _R

        shipped = _R().active()
    except Exception:  # noqa: BLE001
        shipped = None
    os.environ["OMNISEG_HOME"] = tempfile.mkdtemp(prefix="omniseg-latency-")

    import napari
    import numpy as np
    from qtpy.QtCore import QEventLoop, QTimer
    from qtpy.QtWidgets import QApplication

    from napari_omniseg._widgets._regions import camera
    from napari_omniseg._widgets.export import ExportWidget
    from napari_omniseg._widgets.finetune import FinetuneWidget
    from napari_omniseg._widgets.review import ReviewWidget
    from napari_omniseg._widgets.segment import SegmentWidget
    from napari_omniseg.model import ModelRegistry, new_checkpoint, save_checkpoint

    reg = ModelRegistry()
    if shipped is not None:
        reg.set_active(shipped)
        model_note = f"checkpoint {shipped.name}"
    else:
        ck = new_checkpoint(seed=0)
        reg.set_active(save_checkpoint(ck.model, reg.root / "random.safetensors", ck.tissues))
        model_note = "randomly initialised model (no shipped checkpoint found; same compute per tile)"

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1400, 900)
    viewer.open_sample("napari-omniseg", "renal_demo")
    seg, rev, exp, ft = SegmentWidget(viewer), ReviewWidget(viewer), ExportWidget(viewer), FinetuneWidget(viewer)
    for w in (seg, rev, exp, ft):
        viewer.window.add_dock_widget(w)
    if a.threads:
        seg._threads.value = a.threads
        ft._threads.value = a.threads
    tissues = [t for t in a.tissues.split(",") if t]
    seg.set_tissues(tissues)
    ft._epochs.value = a.epochs
    app = QApplication.instance()

    ticks: list[float] = []
    last = [time.perf_counter()]

    def tick():
        now = time.perf_counter()
        ticks.append((now - last[0]) * 1000.0 - 10.0)
        last[0] = now

    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(tick)
    pan = QTimer()
    pan.setInterval(100)
    k = [0]

    def do_pan():
        k[0] += 1
        cam = camera(viewer)
        c = np.asarray(cam.center, float)
        c[-1] += 5.0 * (1 if (k[0] // 20) % 2 == 0 else -1)
        cam.center = tuple(c)

    pan.timeout.connect(do_pan)

    def measure(until) -> dict:
        ticks.clear()
        last[0] = time.perf_counter()
        loop = QEventLoop()
        check = QTimer()
        check.setInterval(20)
        check.timeout.connect(lambda: loop.quit() if until() else None)
        timer.start()
        if not a.no_pan:
            pan.start()
        check.start()
        t0 = time.perf_counter()
        loop.exec_()
        check.stop()
        timer.stop()
        pan.stop()
        out = _percentiles(ticks[1:])
        out["seconds"] = time.perf_counter() - t0
        out["loadavg_1min_after"] = os.getloadavg()[0]
        return out

    for _ in range(20):  # let the window appear
        app.processEvents()
        time.sleep(0.05)
    viewer.reset_view()
    results = {"machine": f"{os.cpu_count()} CPU cores, X virtual framebuffer (Xvfb, software OpenGL)",
               "model": model_note, "loadavg_1min_before": os.getloadavg()[0],
               "omp_threads": os.environ.get("OMP_NUM_THREADS", ""), "torch_threads": seg._threads.value}
    t_end = time.perf_counter() + a.idle
    results["idle"] = measure(lambda: time.perf_counter() >= t_end)

    r = a.region
    # a first, small run warms up torch (lazy kernel set-up), as any second use of the widget would be
    job = seg.run(region=(0, 0, 128, 128), tissues=tissues)
    results["warmup"] = measure(lambda: job.finished)
    job = seg.run(region=(0, 0, r, r), tissues=tissues)
    if job is None:
        print("could not start segmentation:", seg.status.value, file=sys.stderr)
        return 1
    results["segment"] = measure(lambda: job.finished)
    results["segment"]["what"] = f"{r} x {r} px region at 1 um/px, tissues {', '.join(tissues)}; {seg.status.value}"
    if job.error is not None:
        print("segmentation failed:", job.error, file=sys.stderr)
        return 1

    for t in tissues:
        rev.set_reviewed(t)
    rev.commit()
    exp._patch.value = 128
    job = exp.export()
    measure(lambda: job.finished)
    job = ft.start()
    if job is None:
        print("could not start fine-tuning:", ft.status.value, file=sys.stderr)
        return 1
    results["finetune"] = measure(lambda: job.finished)
    res = ft.result
    if res is not None:
        results["finetune"]["what"] = (f"{a.epochs} epochs, crop 128, frozen encoder, {res.n_train} train / {res.n_val} "
                                       f"held-out patches; Dice {res.before_dice} -> {res.after_dice}")
    print(json.dumps(results, indent=1))
    print()
    print(f"{results['machine']}; torch threads {results['torch_threads']}; 1-min load average before "
          f"{results['loadavg_1min_before']:.2f}")
    print(f"{'phase':<10} {'ticks':>6} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} {'wall s':>7} {'load':>5}")
    for ph in ("idle", "warmup", "segment", "finetune"):
        v = results.get(ph, {})
        if v.get("n"):
            print(f"{ph:<10} {v['n']:>6} {v['p50']:>8.1f} {v['p95']:>8.1f} {v['max']:>8.1f} {v['seconds']:>7.1f} "
                  f"{v['loadavg_1min_after']:>5.2f}")
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
