"""Screenshots for docs/user-guide.md, and the fine-tune cost/gain measured on the way.

Drives the real plugin in a real napari window on the renal sample (kidney tissue,
test split of the demo data, which the shipped model never trained on):

1. open the sample, segment the field of view;
2. ask for a whole-slide run (the time estimate);
3. review: per patch of the mosaic, segment it, replace the model's labels of the
   tissue that patch was annotated for by the annotation (as a pathologist would
   paint them), mark that tissue reviewed, commit; only half of the patches are
   corrected, the other half is kept for an independent evaluation;
4. export the corrections, fine-tune with the widget's CPU defaults, make the new
   model active (which re-segments the current region);
5. segment the whole sample, follow the review queue (Next region) and measure the
   whole-slide result in the Measurements dock.

Prints what the fine-tune cost and what it gained, on the widget's own held-out
patches and on the sample patches that were never corrected.

    OMP_NUM_THREADS=2 xvfb-run -a -s "-screen 0 1600x1000x24" python docs/images/make_screenshots.py

Pillow, when importable, quantises the PNGs to 256 colours to keep them small.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _save(viewer, name: str, max_kb: int = 300) -> Path:
    import numpy as np

    img = viewer.screenshot(canvas_only=False, flash=False)
    path = HERE / name
    try:
        from PIL import Image

        im = Image.fromarray(np.asarray(img)[..., :3])
        for width in (1400, 1200, 1000, 900):
            if im.width > width:
                im2 = im.resize((width, round(im.height * width / im.width)), Image.LANCZOS)
            else:
                im2 = im
            q = im2.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
            q.save(path, optimize=True)
            if path.stat().st_size <= max_kb * 1024:
                break
    except ImportError:
        import imageio.v3 as iio

        iio.imwrite(path, np.asarray(img)[..., :3])
    print(f"  wrote {path.name} ({path.stat().st_size // 1024} KB)")
    return path


def main() -> int:
    from napari_omniseg.model.registry import ModelRegistry, shipped_checkpoint

    try:
        user_active = ModelRegistry().active()
    except Exception:  # noqa: BLE001
        user_active = None
    base = shipped_checkpoint() or user_active
    if base is None:
        print("no trained checkpoint (shipped or active): screenshots would show an untrained model", file=sys.stderr)
        return 1
    os.environ["OMNISEG_HOME"] = tempfile.mkdtemp(prefix="omniseg-docs-")

    import napari
    import numpy as np
    from qtpy.QtCore import QEventLoop, QTimer
    from qtpy.QtWidgets import QApplication

    from napari_omniseg._widgets._regions import camera
    from napari_omniseg._widgets.segment import SCOPE_FOV, SCOPE_SLIDE
    from napari_omniseg.model import load_checkpoint
    from napari_omniseg.tissues import get_tissue
    from napari_omniseg.training.data import Sample
    from napari_omniseg.training.loop import evaluate_samples

    reg = ModelRegistry()
    reg.set_active(base)
    app = QApplication.instance() or QApplication([])

    def wait(job, what):
        if job is None:
            raise SystemExit(f"{what} did not start")
        loop = QEventLoop()
        t = QTimer()
        t.setInterval(50)
        t.timeout.connect(lambda: loop.quit() if job.finished else None)
        t.start()
        loop.exec_()
        t.stop()
        if job.error is not None:
            raise SystemExit(f"{what} failed: {job.error!r}")
        return job

    def settle(n=30):
        from napari._qt.dialogs.qt_notification import NapariQtNotification

        for _ in range(n):
            app.processEvents()
            time.sleep(0.02)
        for w in viewer.window._qt_window.findChildren(NapariQtNotification):
            w.close()  # the toasts would cover the canvas
        app.processEvents()

    viewer = napari.Viewer(title="napari-omniseg")
    viewer.window._qt_window.resize(1560, 960)
    viewer.open_sample("napari-omniseg", "renal_demo")
    image, gt_layer = viewer.layers[0], viewer.layers[1]
    # opened the way a user does (Plugins menu -> napari's plugin machinery)
    docks, ws = {}, {}
    for name in ("Segment", "Review and correct", "Export training data", "Fine-tune"):
        docks[name], ws[name] = viewer.window.add_plugin_dock_widget("napari-omniseg", name, tabify=True)
    seg, rev, exp, ft = (ws[n] for n in ("Segment", "Review and correct", "Export training data", "Fine-tune"))
    from qtpy.QtCore import Qt

    for d in docks.values():
        d.setMaximumWidth(470)  # leave the canvas most of the window
    viewer.window._qt_window.resizeDocks([docks["Segment"]], [470], Qt.Horizontal)
    patches = image.metadata["patches"]
    settle()

    # 1. the sample (its annotations shown) and the Segment widget
    docks["Segment"].raise_()
    cam = camera(viewer)
    gt_layer.visible = True
    viewer.reset_view()
    settle()
    _save(viewer, "01-sample.png")
    gt_layer.visible = False

    # 2. segment the field of view: the H&E and PAS rows; the sample holds 10x patches,
    #    annotated for the 10x tissues, so those are the tissues asked for
    seg.set_tissues(["distal_tubule", "proximal_tubule", "artery"])
    cam.center = (330, 512)
    cam.zoom = 1.1
    settle()
    seg._scope.value = SCOPE_FOV
    t0 = time.perf_counter()
    wait(seg.run(), "segmentation")
    fov_s = time.perf_counter() - t0
    print(f"  field of view {seg.state.region}: {seg.status.value}")
    settle()
    _save(viewer, "02-segmented.png")

    # 3. the whole-slide estimate (all tissues the image's resolution allows)
    seg.set_tissues(["distal_tubule", "proximal_tubule", "glomerular_unit", "glomerular_tuft", "artery"])
    seg._scope.value = SCOPE_SLIDE
    wait(seg.run(), "estimate")
    settle()
    _save(viewer, "03-estimate.png")
    estimate_text = seg.status.value
    seg._scope.value = SCOPE_FOV

    # 4. corrections, patch by patch, for the tissue each patch was annotated for
    gt = np.asarray(gt_layer.data)
    corrected, held = patches[0::2], patches[1::2]
    # the patch shown in the screenshots: the first corrected proximal tubule patch
    show_i = next(i for i, p in enumerate(corrected) if "proximal_tubule" in p["tissues"])
    t_review = time.perf_counter()
    for i, p in enumerate(corrected):
        y, x, h, w = p["box"]
        wait(seg.run(region=(x, y, w, h), tissues=p["tissues"]), f"segmentation of patch {i}")
        s = seg.state.session
        for tname in p["tissues"]:
            t = get_tissue(tname)
            wr = s.regions[tname]
            lyr = next(lyr for lyr in viewer.layers if lyr.metadata.get("omniseg", {}).get("kind") == "working"
                       and lyr.metadata["omniseg"]["tissue"] == tname)
            truth = (gt[y : y + h, x : x + w] == t.id + 1).astype(np.uint8)
            # the annotation on the tissue grid (10x tissues: the sample's own grid)
            sub = truth[: wr.data.shape[0], : wr.data.shape[1]]
            idx = np.nonzero(wr.data[: sub.shape[0], : sub.shape[1]] != sub)
            if i == show_i and tname == "proximal_tubule":
                before = lyr.data.copy()
            lyr.data_setitem(idx, sub[idx])  # through napari's edit history, as a brush would
            rev.set_reviewed(tname)
        if i == show_i:
            lyr = next(lyr for lyr in viewer.layers if lyr.metadata.get("omniseg", {}).get("kind") == "working"
                       and lyr.metadata["omniseg"]["tissue"] == "proximal_tubule")
            tname = "proximal_tubule"
            # show the model's labels, then the corrected ones, of that patch's tissue only
            docks["Review and correct"].raise_()
            for other in viewer.layers:
                om = other.metadata.get("omniseg", {}) if hasattr(other, "metadata") else {}
                if om.get("kind") == "working":
                    other.visible = other is lyr
            viewer.layers.selection.active = lyr
            lyr.mode = "paint"
            lyr.brush_size = 12
            lyr.opacity = 0.6
            cam.center = (y + h / 2 + 30, x + w / 2)
            cam.zoom = 2.5
            corrected_data = lyr.data.copy()
            lyr.data = before  # napari keeps the same layer; the session array is restored below
            settle()
            _save(viewer, "04a-before-correction.png")
            lyr.data = s.regions[tname].data
            np.testing.assert_array_equal(lyr.data, corrected_data)
            rev.autosave(force=True)
            rev.refresh()
            settle()
            _save(viewer, "04-review.png")
            for other in viewer.layers:
                om = other.metadata.get("omniseg", {}) if hasattr(other, "metadata") else {}
                if om.get("kind") == "working":
                    other.visible = True
        rev.commit()
    review_s = time.perf_counter() - t_review

    # 5. export
    docks["Export training data"].raise_()
    exp._patch.value = 128
    wait(exp.export(), "export")
    exp.refresh()
    settle()
    _save(viewer, "05-export.png")
    export_text = exp.status.value

    # 6. fine-tune with the widget's defaults, then make it active
    docks["Fine-tune"].raise_()
    t0 = time.perf_counter()
    wait(ft.start(), "fine-tuning")
    ft_s = time.perf_counter() - t0
    res = ft.result
    settle()
    _save(viewer, "06-finetune.png")
    last = held[0]
    y, x, h, w = last["box"]
    seg.state.region, seg.state.tissues = (x, y, w, h), list(last["tissues"])
    for tname in list(seg.state.session.regions):
        if seg.state.session.regions[tname].has_uncommitted_edits():
            seg.state.session.discard(tname)
    job = ft.activate()  # re-segments the region, unless it shows committed corrections
    cam.center = (y + h / 2, x + w / 2)
    cam.zoom = 2.6
    settle()
    if job is not None:
        wait(job, "re-segmentation with the new model")
    else:  # as the widget says: segment the region again to see the new model's prediction
        seg._scope.value = SCOPE_FOV
        wait(seg.run(), "re-segmentation with the new model")
    settle()
    _save(viewer, "07-resegmented.png")

    # an independent check: the sample patches that were never corrected
    def samples(ps):
        out = []
        for p in ps:
            yy, xx, hh, ww = p["box"]
            for tname in p["tissues"]:
                t = get_tissue(tname)
                out.append(Sample(Path(p["file"]), Path(p["file"]), t, stain=p["stain"],
                                  image=np.ascontiguousarray(np.asarray(image.data)[yy : yy + hh, xx : xx + ww, :3]),
                                  mask=gt[yy : yy + hh, xx : xx + ww] == t.id + 1))
        return out

    unseen = samples(held)
    _, before = evaluate_samples(load_checkpoint(base), unseen)
    _, after = evaluate_samples(load_checkpoint(res.path), unseen)
    report = {
        "machine": f"{os.cpu_count()} CPU cores, torch threads {ft._threads.value}, Xvfb",
        "base_model": str(Path(base).name),
        "fov_seconds": round(fov_s, 1),
        "estimate": estimate_text,
        "review_commit_seconds_scripted": round(review_s, 1),
        "export": export_text,
        "finetune": {"seconds": round(ft_s, 1), "epochs": int(ft._epochs.value), "crop": int(ft._crop.value),
                     "freeze_encoder": bool(ft._freeze.value), "n_train": res.n_train, "n_val": res.n_val,
                     "heldout_dice_before": res.before_dice, "heldout_dice_after": res.after_dice,
                     "per_tissue": res.per_tissue},
        "uncorrected_patches": {"n": len(unseen), "dice_before": before["mean_dice"], "dice_after": after["mean_dice"],
                                "per_tissue_before": {k: v["dice"] for k, v in before["per_tissue"].items()},
                                "per_tissue_after": {k: v["dice"] for k, v in after["per_tissue"].items()}},
    }
    # 8. the whole sample, the review queue, the measurements
    for tname in list(seg.state.session.regions):
        seg.state.session.discard(tname)
    seg.set_tissues(["distal_tubule", "proximal_tubule", "glomerular_unit", "glomerular_tuft", "artery"])
    seg._scope.value = SCOPE_SLIDE
    wait(seg.run(), "estimate")
    t0 = time.perf_counter()
    wait(seg.run(), "whole-slide run")
    slide_s = time.perf_counter() - t0
    docks["Review and correct"].raise_()
    t0 = time.perf_counter()
    sug = rev.next_region()
    next_s = time.perf_counter() - t0
    settle()
    _save(viewer, "08-review-queue.png")
    _, meas = viewer.window.add_plugin_dock_widget("napari-omniseg", "Measurements", tabify=True)
    meas.measure(scope="Whole-slide result")
    if meas.job is not None:
        wait(meas.job, "measuring")
    viewer.reset_view()
    settle()
    _save(viewer, "09-measurements.png")
    report["whole_slide_seconds"] = round(slide_s, 1)
    report["review_queue"] = {"first": sug.why() if sug else None, "next_region_seconds": round(next_s, 3),
                              "length": len(rev.review_queue() or [])}
    report["measurements_rows"] = meas.rows
    print(json.dumps(report, indent=1, default=str))
    (HERE / "measurements.json").write_text(json.dumps(report, indent=1, default=str))
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
