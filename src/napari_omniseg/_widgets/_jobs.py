"""Background jobs for the widgets: a core function in a napari ``thread_worker``.

The core takes ``on_progress`` and ``should_stop`` callbacks.  :func:`start_job`
runs it in a plain thread inside a *generator* worker that yields each progress
event (at most a few per second, so the Qt event loop stays free), drives a napari
progress bar, and turns the widget's Cancel into ``should_stop() -> True``.  The
result, a cancellation or an error arrives on the main thread through the given
callbacks.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

_DONE = object()


class _Failed:
    """An exception carried out of the worker as a return value.

    superqt's GeneratorWorker treats a RuntimeError raised by the generator as "the
    worker was deleted" and then emits neither ``errored`` nor ``finished``; our
    cancellations (SegmentationCancelled, TrainingCancelled) are RuntimeErrors, so
    errors travel as values instead.
    """

    def __init__(self, error: BaseException):
        self.error = error


@dataclass
class Job:
    name: str
    stop_event: threading.Event = field(default_factory=threading.Event)
    worker: Any = None
    pbar: Any = None
    started: float = field(default_factory=time.perf_counter)
    finished: bool = False
    result: Any = None
    error: BaseException | None = None

    def cancel(self) -> None:
        """Ask the core to stop at its next check; the worker ends by itself."""
        self.stop_event.set()

    @property
    def running(self) -> bool:
        return not self.finished


def _bridge(fn: Callable, stop_event: threading.Event, min_interval: float):
    """Generator: run ``fn(on_progress, should_stop)`` in a thread, yield its progress events."""
    q: queue.Queue = queue.Queue()
    box: dict = {}
    last = [0.0]

    def on_progress(ev: dict) -> None:
        now = time.perf_counter()
        # always pass epoch/phase changes; thin out the per-step events
        if ev.get("phase") in ("train", "segment", "export") and now - last[0] < min_interval:
            return
        last[0] = now
        q.put(ev)

    def target():
        try:
            box["result"] = fn(on_progress, stop_event.is_set)
        except BaseException as e:  # delivered to the main thread below
            box["error"] = e
        finally:
            q.put(_DONE)

    th = threading.Thread(target=target, name="omniseg-job", daemon=True)
    th.start()
    ended = False
    try:
        while True:
            try:
                ev = q.get(timeout=0.1)
            except queue.Empty:
                yield None  # lets the worker notice quit() promptly
                continue
            if ev is _DONE:
                ended = True
                break
            yield ev
    finally:
        if not ended:  # the generator was closed early (worker.quit()): stop the core too
            stop_event.set()
        th.join()
    if "error" in box:
        return _Failed(box["error"])
    return box.get("result")


def _activity_gif(paused: bool) -> None:
    """Pause (or resume) the animated "in progress" GIF of napari's status bar.

    While any napari progress bar runs, napari animates a GIF in the status bar.
    With software OpenGL (no GPU, remote desktops, Xvfb) every frame repaints the
    window: measured here at about 45 % of one core, taken from the model on a
    2-core machine (benchmarks/viewer_latency.py).  The progress bar itself stays;
    only the spinner is held still while our job runs.  Uses napari internals, so
    every failure is ignored.
    """
    try:
        from napari._qt.dialogs.qt_activity_dialog import ActivityToggleItem
        from qtpy.QtWidgets import QApplication

        for top in QApplication.topLevelWidgets():
            for item in top.findChildren(ActivityToggleItem):
                ind = item._inProgressIndicator
                mov = ind.movie()
                if mov is None:
                    continue
                if paused:
                    mov.setPaused(True)
                elif ind.isVisible():  # other progress bars still running: let them animate
                    mov.setPaused(False)
    except Exception:  # noqa: BLE001 - cosmetic only
        pass


def start_job(
    name: str,
    fn: Callable[[Callable, Callable], Any],
    *,
    on_progress: Callable[[dict], None] | None = None,
    on_done: Callable[[Any], None] | None = None,
    on_error: Callable[[BaseException], None] | None = None,
    on_finally: Callable[[], None] | None = None,
    total: int = 0,
    min_interval: float = 0.25,
) -> Job:
    """Start ``fn(on_progress, should_stop)`` in the background; returns the :class:`Job`."""
    from napari.qt.threading import create_worker
    from napari.utils import progress

    from qtpy.QtCore import QTimer

    job = Job(name)
    job.pbar = progress(total=total or 0, desc=name)
    _activity_gif(True)

    def _yielded(ev):
        if ev is None:
            return
        done, tot = ev.get("done"), ev.get("total")
        if tot is None and "steps" in ev:
            e, E, st, S = ev.get("epoch", 1), ev.get("epochs", 1), ev.get("step", 0), ev.get("steps", 1)
            done, tot = (e - 1) * S + st, E * S
        try:
            if tot:
                if job.pbar.total != tot:
                    job.pbar.total = tot
                job.pbar.n = min(int(done or 0), int(tot))
                job.pbar.refresh()
        except Exception:  # a progress bar must never break the job
            pass
        if on_progress is not None:
            on_progress(ev)

    def _returned(res):
        if isinstance(res, _Failed):
            _errored(res.error)
            return
        job.result = res
        if on_done is not None:
            try:
                on_done(res)
            except Exception as e:  # noqa: BLE001 - showing a result must not kill the viewer
                _errored(e)

    def _errored(e):
        job.error = e
        if on_error is not None:
            on_error(e)

    def _finished():
        job.finished = True
        try:
            job.pbar.close()
        except Exception:
            pass
        QTimer.singleShot(0, lambda: _activity_gif(False))
        if on_finally is not None:
            on_finally()

    worker = create_worker(_bridge, fn, job.stop_event, min_interval, _start_thread=False)
    worker.yielded.connect(_yielded)
    worker.returned.connect(_returned)
    worker.errored.connect(_errored)
    worker.finished.connect(_finished)
    job.worker = worker
    worker.start()
    return job
