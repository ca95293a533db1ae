"""How fast the review queue answers in the GUI: time from pressing Next to the region
being shown (camera moved, working regions open, canvas redrawn).

Opens the renal sample in a real napari window, segments the whole sample with the
Segment widget (the queue needs a whole-slide result), then presses *Next region*
``--presses`` times (and *Previous* a few times) and prints, per press, the time the
call took plus the time to process the Qt events that redraw the canvas;
p50 / p95 / max in ms.  The first press also ranks the queue.

    OMP_NUM_THREADS=2 xvfb-run -a -s "-screen 0 1600x1000x24" python benchmarks/queue_latency.py

Uses the active (or shipped) checkpoint, in a temporary OMNISEG_HOME.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presses", type=int, default=10)
    ap.add_argument("--tissues", default="distal_tubule,proximal_tubule,glomerular_unit,glomerular_tuft,artery")
    a = ap.parse_args(argv)
    os.environ["OMNISEG_HOME"] = tempfile.mkdtemp(prefix="omniseg-queue-")
    import napari
    import numpy as np
    from qtpy.QtCore import QEventLoop, QTimer
    from qtpy.QtWidgets import QApplication

    from napari_omniseg._widgets.segment import SCOPE_SLIDE

    app = QApplication.instance() or QApplication([])
    viewer = napari.Viewer(title="queue latency")
    viewer.open_sample("napari-omniseg", "renal_demo")
    _, seg = viewer.window.add_plugin_dock_widget("napari-omniseg", "Segment")
    _, rev = viewer.window.add_plugin_dock_widget("napari-omniseg", "Review and correct")

    def wait(job):
        loop, t = QEventLoop(), QTimer()
        t.setInterval(50)
        t.timeout.connect(lambda: loop.quit() if job.finished else None)
        t.start()
        loop.exec_()
        t.stop()
        if job.error is not None:
            raise SystemExit(f"failed: {job.error!r}")

    seg.set_tissues(a.tissues.split(","))
    seg._scope.value = SCOPE_SLIDE
    wait(seg.run())  # the estimate
    t0 = time.perf_counter()
    wait(seg.run())  # the run
    slide_s = time.perf_counter() - t0

    def press(fn):
        t = time.perf_counter()
        sug = fn()
        for _ in range(5):
            app.processEvents()
        return (time.perf_counter() - t) * 1000.0, sug

    t = time.perf_counter()  # ranking alone (then dropped, so the first press ranks again)
    rev.review_queue()
    rank_ms = (time.perf_counter() - t) * 1000.0
    rev._queue = None
    first_ms, sug = press(rev.next_region)
    if sug is None:
        raise SystemExit(f"the queue is empty: {rev.status.value}")
    times = []
    for k in range(a.presses):
        ms, _ = press(rev.previous_region if k % 4 == 3 else rev.next_region)
        times.append(ms)
    arr = np.asarray(times)
    out = {"whole_slide_seconds": round(slide_s, 1), "queue_length": len(rev.review_queue() or []),
           "first_press_ms (ranks the queue)": round(first_ms, 1), "ranking_alone_ms": round(rank_ms, 1), "presses": len(times),
           "p50_ms": round(float(np.percentile(arr, 50)), 1), "p95_ms": round(float(np.percentile(arr, 95)), 1),
           "max_ms": round(float(arr.max()), 1), "cpu_cores": os.cpu_count()}
    print(json.dumps(out, indent=1))
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
