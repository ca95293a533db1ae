"""What a pathologist sees in the Review widget while correcting (run under xvfb-run).

Widgets are opened the way a user opens them (napari's plugin machinery), on the
renal sample, with a small random model so that painting is visible.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytestmark = pytest.mark.gui

SMALL = (0, 0, 256, 256)


@pytest.fixture
def opened(make_napari_viewer, demo_dir):
    from napari_omniseg.inference.engine import EngineConfig
    from napari_omniseg.model import ModelRegistry, new_checkpoint, save_checkpoint
    from napari_omniseg.model.network import NetConfig
    from napari_omniseg.tissues import TISSUES

    reg = ModelRegistry()  # under the per-test OMNISEG_HOME (conftest)
    cfg = NetConfig(tissue_scales=tuple(t.scale_id for t in TISSUES), pool_norm="none", controller_init="uniform")
    ck = new_checkpoint(cfg=cfg, seed=0)
    reg.set_active(save_checkpoint(ck.model, reg.root / "base.safetensors", ck.tissues))
    viewer = make_napari_viewer()
    viewer.open_sample("napari-omniseg", "renal_demo")
    _, seg = viewer.window.add_plugin_dock_widget("napari-omniseg", "Segment")
    _, rev = viewer.window.add_plugin_dock_widget("napari-omniseg", "Review and correct")
    seg.engine_config = EngineConfig(core=128, margin=16, batch_size=4)
    seg.set_tissues(["distal_tubule", "proximal_tubule"])
    return viewer, seg, rev


def _segment(qtbot, seg, region=SMALL):
    job = seg.run(region=region)
    assert job is not None
    qtbot.waitUntil(lambda: job.finished, timeout=120_000)
    assert job.error is None, job.error


def _layer(viewer, name):
    return next(lyr for lyr in viewer.layers if lyr.name == name)


def test_row_status_follows_undo(opened, qtbot):
    """Paint -> "to commit"; undo back to the prediction -> no longer "to commit"."""
    viewer, seg, rev = opened
    _segment(qtbot, seg)
    dt = _layer(viewer, "Distal tubule")
    info = rev._rows["distal_tubule"][1]
    dt.paint((60, 60), 1, refresh=True)
    qtbot.waitUntil(lambda: "to commit" in info.value, timeout=6000)
    dt.undo()  # napari's undo: no paint event
    qtbot.waitUntil(lambda: "to commit" not in info.value, timeout=6000)
    assert info.value == "as predicted"


def test_an_error_disappears_once_its_cause_is_fixed(opened, qtbot):
    viewer, seg, rev = opened
    rev.commit()  # nothing segmented yet
    assert "segment a region first" in rev.status.value
    _segment(qtbot, seg)
    assert rev.status.value == ""  # the region exists now: the old error is gone
    rev.commit()  # nothing reviewed
    assert "Mark the tissues you reviewed first" in rev.status.value
    rev.set_reviewed("distal_tubule")
    assert rev.status.value == ""
    assert rev.commit() and "Committed" in rev.status.value  # messages of success stay


def test_default_project_folder_is_not_beside_the_slide(opened, qtbot, tmp_path):
    from pathlib import Path

    from napari_omniseg.corrections.session import projects_home

    viewer, seg, rev = opened
    _segment(qtbot, seg)
    folder = Path(seg.state.session.folder)
    assert folder.parent == projects_home()
    slide = viewer.layers[0].metadata.get("path")
    if slide:
        assert not any(p.suffix == ".omniseg" for p in Path(slide).parent.iterdir())


def _keys(viewer, key):
    """Press a key the way the canvas does: through napari's key-map handler."""
    handler = viewer.window._qt_viewer._key_map_handler
    handler.press_key(key)
    handler.release_key(key)


def test_keyboard_shortcuts_step_tissues_mark_reviewed_and_commit(opened, qtbot):
    viewer, seg, rev = opened
    _segment(qtbot, seg)
    _keys(viewer, "Shift-N")
    dt = _layer(viewer, "Distal tubule")
    assert viewer.layers.selection.active is dt and dt.mode == "paint"
    _keys(viewer, "Shift-N")
    pt = _layer(viewer, "Proximal tubule")
    assert viewer.layers.selection.active is pt
    _keys(viewer, "Shift-N")  # wraps around
    assert viewer.layers.selection.active is dt
    _keys(viewer, "Shift-B")
    assert viewer.layers.selection.active is pt
    _keys(viewer, "Shift-R")
    assert seg.state.session.regions["proximal_tubule"].reviewed and rev._rows["proximal_tubule"][0].value
    _keys(viewer, "Shift-R")
    assert not seg.state.session.regions["proximal_tubule"].reviewed
    _keys(viewer, "Shift-R")
    _keys(viewer, "Shift-C")
    assert [c.tissue for c in seg.state.session.commits] == ["proximal_tubule"]


def test_layer_names_are_readable_and_the_unit_is_an_outline(opened, qtbot):
    from napari_omniseg.tissues import TISSUES

    viewer, seg, rev = opened
    seg.set_tissues(["glomerular_unit", "glomerular_tuft"])
    _segment(qtbot, seg)
    unit, tuft = _layer(viewer, "Glomerular unit"), _layer(viewer, "Glomerular tuft")
    assert unit.contour > 0 and tuft.contour == 0  # the tuft's fill shows inside the unit's outline
    for t in TISSUES:
        assert "(" not in t.short_label and len(t.short_label) <= 22


def test_measurements_dock_counts_and_areas(opened, qtbot, tmp_path):
    import csv

    viewer, seg, rev = opened
    _, meas = viewer.window.add_plugin_dock_widget("napari-omniseg", "Measurements")
    assert meas.rows == [] and "segment" in meas._note.value.lower()
    _segment(qtbot, seg)
    session = seg.state.session
    wr = session.regions["distal_tubule"]
    wr.data[:] = 0
    wr.data[10:30, 10:30] = 1  # two objects, 400 + 100 px
    wr.data[50:60, 50:60] = 1
    _layer(viewer, "Distal tubule").refresh()
    rows = meas.measure()
    dt = next(r for r in rows if r["tissue"] == "distal_tubule")
    px_um = wr.mpp
    assert dt["objects"] == 2 and dt["area_um2"] == pytest.approx(500 * px_um**2)
    x, y, w, h = wr.region
    assert dt["density_per_mm2"] == pytest.approx(2 / (w * h * session.slide.mpp**2 / 1e6))
    assert meas.table.rowCount() == len(rows) == 2
    assert meas.table.item(0, 0).text() == "Distal tubule" and meas.table.item(0, 1).text() == "2"
    text = meas.copy()
    from qtpy.QtWidgets import QApplication

    assert QApplication.clipboard().text() == text and text.count("\n") == 3
    meas._csv.value = str(tmp_path / "m.csv")
    out = meas.save_csv()
    got = list(csv.DictReader(out.open()))
    assert got[0]["tissue"] == "distal_tubule" and int(got[0]["objects"]) == 2
    assert float(got[0]["area_um2"]) == pytest.approx(500 * px_um**2)


def test_review_queue_next_moves_the_camera_and_opens_the_region(make_napari_viewer, qtbot, demo_dir):
    """Whole-slide result -> Next (button and Shift+J) shows the most uncertain region,
    opens it for painting, says why; a committed region leaves the queue; the position
    is kept in the project."""
    import json

    from napari_omniseg._sample_data import build_renal_mosaic
    from napari_omniseg._widgets._regions import camera
    from napari_omniseg._widgets.review import QUEUE_FILE
    from napari_omniseg._widgets.segment import SCOPE_SLIDE
    from napari_omniseg.inference.engine import EngineConfig
    from napari_omniseg.labels.review import suggest
    from napari_omniseg.labels.store import LabelStore
    from napari_omniseg.model import ModelRegistry, new_checkpoint, save_checkpoint

    reg = ModelRegistry()
    ck = new_checkpoint(seed=0)  # the default (working-head) init: probabilities vary over the image
    reg.set_active(save_checkpoint(ck.model, reg.root / "base.safetensors", ck.tissues))
    img, _gt, _p = build_renal_mosaic(demo_dir)
    viewer = make_napari_viewer()
    image = viewer.add_image(img[:256, : min(768, img.shape[1])], name="crop",
                             metadata={"mpp": 1.0, "slide_id": "queue-test"})
    _, seg = viewer.window.add_plugin_dock_widget("napari-omniseg", "Segment")
    _, rev = viewer.window.add_plugin_dock_widget("napari-omniseg", "Review and correct")
    seg.engine_config = EngineConfig(core=128, margin=16)
    seg.set_tissues(["distal_tubule", "proximal_tubule"])
    assert rev.next_region() is None and "Whole slide" in rev.status.value
    for _ in range(2):  # estimate, then the run
        job = seg.run(scope=SCOPE_SLIDE)
        qtbot.waitUntil(lambda: job.finished, timeout=120_000)
        assert job.error is None, job.error
    session = seg.state.session
    ranked = suggest(LabelStore(session.store_path), n=100)
    assert len(ranked) >= 1
    _keys(viewer, "Shift-J")
    first = ranked[0]
    x, y, w, h = first.box
    cam = camera(viewer)
    assert cam.center[-2] == pytest.approx(y + h / 2, abs=1) and cam.center[-1] == pytest.approx(x + w / 2, abs=1)
    assert cam.zoom > 1.0  # zoomed in on the 128 px block
    work = _layer(viewer, {"distal_tubule": "Distal tubule", "proximal_tubule": "Proximal tubule"}[first.tissue])
    assert work.editable and work.mode == "paint" and viewer.layers.selection.active is work
    assert session.regions[first.tissue].region == first.box
    stores = [lyr for lyr in viewer.layers if lyr.metadata.get("omniseg", {}).get("kind") == "store"]
    assert stores and not any(lyr.visible for lyr in stores)  # no doubled colours under the editable copies
    assert "1 of" in rev._why.value and "score" in rev._why.value
    assert json.loads((session.folder / QUEUE_FILE).read_text())["key"] == first.key
    # correct it, mark reviewed, commit: it leaves the queue, Next goes to the one after it
    work.data_setitem((np.arange(0, 20), np.arange(0, 20)), 1)
    rev.set_reviewed(first.tissue)
    for t in session.regions:
        if t != first.tissue:
            session.discard(t)
    assert rev.commit()
    sug = rev.next_region()
    requeued = rev.review_queue()  # ranked again without the committed region (a neighbour it hid may return)
    assert first.key not in [q.key for q in requeued]
    if requeued:
        assert sug is not None and sug.key == requeued[0].key
    else:
        assert sug is None and "Nothing left" in rev._why.value
    if requeued:
        _keys(viewer, "Shift-K")  # back: the first region is gone, so this is the top of the queue again
        assert json.loads((session.folder / QUEUE_FILE).read_text())["position"] == 0


def test_export_and_finetune_now_from_the_review_widget(opened, qtbot):
    viewer, seg, rev = opened
    _, ft = viewer.window.add_plugin_dock_widget("napari-omniseg", "Fine-tune")
    ft._epochs.value = 1
    ft._crop.value = 64
    ft.config_overrides = {"batch_size": 2}
    _segment(qtbot, seg)
    assert not rev._ft_now.enabled
    assert rev.finetune_now() is None and "commit them first" in rev.status.value
    _layer(viewer, "Distal tubule").data_setitem((np.arange(0, 40), np.arange(0, 40)), 1)
    rev.set_reviewed("distal_tubule")
    rev.commit()
    assert rev._ft_now.enabled and "1 new correction" in rev._ft_now.text
    job = rev.finetune_now()
    assert job is not None
    qtbot.waitUntil(lambda: rev.chain_job is not None, timeout=120_000)
    qtbot.waitUntil(lambda: rev.chain_job.finished, timeout=240_000)
    assert rev.chain_job.error is None, rev.chain_job.error
    assert ft.result is not None and ft.result.path.exists()
    assert seg.state.session.exportable() == [] and not rev._ft_now.enabled


def test_switching_models_never_replaces_painted_corrections(opened, qtbot):
    """Make active / Roll back re-segment the region only when that replaces nothing painted."""
    viewer, seg, rev = opened
    _, ft = viewer.window.add_plugin_dock_widget("napari-omniseg", "Fine-tune")
    _segment(qtbot, seg)
    dt = _layer(viewer, "Distal tubule")
    dt.data_setitem((np.arange(0, 30), np.arange(0, 30)), 1)
    painted = dt.data.copy()
    assert ft._resegment_now() is None and "uncommitted painting" in ft.status.value
    rev.set_reviewed("distal_tubule")
    rev.commit()
    assert ft._resegment_now() is None and "committed corrections" in ft.status.value
    np.testing.assert_array_equal(_layer(viewer, "Distal tubule").data, painted)
    assert seg.state.session.regions["distal_tubule"].reviewed  # the tick stays
    # nothing painted on view: the region is re-segmented with the new model as before
    seg.set_tissues(["proximal_tubule"])
    seg.state.tissues = ["proximal_tubule"]
    job = ft._resegment_now()
    assert job is not None
    qtbot.waitUntil(lambda: job.finished, timeout=120_000)
    assert job.error is None


def test_exporting_again_says_everything_is_exported(opened, qtbot):
    viewer, seg, rev = opened
    _, exp = viewer.window.add_plugin_dock_widget("napari-omniseg", "Export training data")
    _segment(qtbot, seg)
    _layer(viewer, "Distal tubule").data_setitem((np.arange(0, 40), np.arange(0, 40)), 1)
    rev.set_reviewed("distal_tubule")
    rev.commit()
    job = exp.export()
    qtbot.waitUntil(lambda: job.finished, timeout=60_000)
    assert job.error is None and "Exported 1 patches" in exp.status.value
    assert exp.export() is None
    assert "exported already" in exp.status.value and "mark tissues reviewed" not in exp.status.value
