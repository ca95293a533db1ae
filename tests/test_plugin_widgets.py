"""The plugin's widgets in a real napari viewer (run under xvfb-run).

A small random checkpoint and small engine blocks keep these fast on a 2-core CPU;
what is checked is the plumbing: regions, layers, autosave, undo, commit, export,
fine-tune, model switching, cancellation and crash recovery.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytestmark = pytest.mark.gui

SMALL = (0, 0, 256, 256)  # a level-0 (x, y, w, h) region of the renal sample: 2 x 2 blocks of 128 px


@pytest.fixture
def registry():
    from napari_omniseg.model import ModelRegistry, new_checkpoint, save_checkpoint

    from napari_omniseg.model.network import NetConfig
    from napari_omniseg.tissues import TISSUES

    reg = ModelRegistry()  # under the per-test OMNISEG_HOME (conftest)
    # a random model with the reference controller: it marks (almost) nothing, so painting shows
    cfg = NetConfig(tissue_scales=tuple(t.scale_id for t in TISSUES), pool_norm="none", controller_init="uniform")
    ck = new_checkpoint(cfg=cfg, seed=0)
    reg.set_active(save_checkpoint(ck.model, reg.root / "base.safetensors", ck.tissues))
    return reg


@pytest.fixture
def plugin(make_napari_viewer, registry, demo_dir):
    return _open(make_napari_viewer)


def _open(make_napari_viewer):
    from napari_omniseg._widgets.export import ExportWidget
    from napari_omniseg._widgets.finetune import FinetuneWidget
    from napari_omniseg._widgets.review import ReviewWidget
    from napari_omniseg._widgets.segment import SegmentWidget
    from napari_omniseg.inference.engine import EngineConfig

    viewer = make_napari_viewer()
    viewer.open_sample("napari-omniseg", "renal_demo")
    seg, rev, exp, ft = SegmentWidget(viewer), ReviewWidget(viewer), ExportWidget(viewer), FinetuneWidget(viewer)
    for w in (seg, rev, exp, ft):
        viewer.window.add_dock_widget(w)
    seg.engine_config = EngineConfig(core=128, margin=16, batch_size=4)
    seg.set_tissues(["distal_tubule", "proximal_tubule"])
    ft._epochs.value = 1
    ft._crop.value = 64
    ft.config_overrides = {"batch_size": 2}
    return viewer, seg, rev, exp, ft


def _wait(qtbot, job, timeout=120_000):
    assert job is not None
    qtbot.waitUntil(lambda: job.finished, timeout=timeout)
    return job


def _layer(viewer, name):
    return next(lyr for lyr in viewer.layers if lyr.name == name)


def test_end_to_end_segment_correct_export_finetune_resegment(plugin, qtbot, registry):
    viewer, seg, rev, exp, ft = plugin
    image = viewer.layers[0]
    base = registry.active()
    job = _wait(qtbot, seg.run(region=SMALL))
    assert job.error is None, job.error
    dt, pt = _layer(viewer, "Distal tubule"), _layer(viewer, "Proximal tubule")
    n_layers = len(viewer.layers)
    # one layer per tissue, in its colour, aligned with the image (1 um/px sample, 10x tissues)
    assert dt.data.shape == (256, 256) and dt.data.dtype == np.uint8
    assert tuple(dt.scale) == (1.0, 1.0) and tuple(dt.translate) == (0.0, 0.0)
    assert np.allclose(dt.colormap.map(np.array([1]))[0][:3], np.array([0x1F, 0x77, 0xFF]) / 255, atol=0.01)
    assert dt.colormap.map(np.array([0]))[0][3] == 0
    assert dt.metadata["omniseg"]["model_version"].startswith("base@")
    session = seg.state.session
    assert session.regions["distal_tubule"].data is dt.data  # painting edits the session's array

    # paint a correction; autosave catches it; napari's undo still works and is saved too
    dt.paint((60, 60), 1, refresh=True)
    painted = dt.data.copy()
    assert painted.sum() > 0
    qtbot.waitUntil(lambda: not session.pending(), timeout=6000)
    from napari_omniseg.corrections.session import _load_npz

    np.testing.assert_array_equal(_load_npz(session.folder / "work" / "distal_tubule.npz")["data"], painted)
    dt.undo()
    assert dt.data.sum() == 0
    qtbot.waitUntil(lambda: not session.pending(), timeout=6000)
    assert _load_npz(session.folder / "work" / "distal_tubule.npz")["data"].sum() == 0
    dt.redo()
    np.testing.assert_array_equal(dt.data, painted)
    idx = (np.arange(100, 140), np.arange(100, 140))
    dt.data_setitem(idx, 1)

    # review, commit, export
    rev.set_reviewed("distal_tubule")
    rev.set_reviewed("proximal_tubule")
    assert session.regions["distal_tubule"].reviewed
    recs = rev.commit()
    assert [r.tissue for r in recs] == ["distal_tubule", "proximal_tubule"]
    job = _wait(qtbot, exp.export())
    assert job.error is None, job.error
    res = exp.last_result
    assert res.per_tissue == {"distal_tubule": 1, "proximal_tubule": 1}  # 256 px region, 256 px patches
    assert "Exported 2 patches" in exp.status.value
    # more corrections: a second region of the slide, with the complete label map
    seg._map.value = True
    job = _wait(qtbot, seg.run(region=(256, 0, 512, 256)))
    assert len(viewer.layers) == n_layers + 1  # same tissue layers updated in place, plus the map
    assert _layer(viewer, "Distal tubule").data.shape == (256, 512)
    tmap = _layer(viewer, "tissue map")
    assert tmap.data.shape == (256, 512) and not tmap.editable
    assert set(np.unique(tmap.data)) <= {0, 1, 2, 255}
    n_layers += 1
    rev.set_reviewed("distal_tubule")
    rev.set_reviewed("proximal_tubule")
    rev.commit()
    exp._patch.value = 128
    _wait(qtbot, exp.export())
    assert exp.last_result.per_tissue == {"distal_tubule": 8, "proximal_tubule": 8}
    assert exp.last_result.val_per_tissue == {"distal_tubule": 2, "proximal_tubule": 2}

    # fine-tune: a new checkpoint, not active until asked
    job = _wait(qtbot, ft.start(), timeout=240_000)
    assert job.error is None, job.error
    res = ft.result
    assert res.path.exists() and registry.active() == base
    assert res.before is not None and res.after is not None
    assert "held-out" in ft._result.value
    # make it active: re-segmentation of the current region uses it
    job = _wait(qtbot, ft.activate())
    assert job.error is None, job.error
    assert registry.active() == res.path
    assert seg.state.last_model_version == res.version
    assert _layer(viewer, "Distal tubule").metadata["omniseg"]["model_version"] == res.version
    assert session.regions["distal_tubule"].model_version == res.version
    assert len(viewer.layers) == n_layers
    # roll back: the base model again
    job = _wait(qtbot, ft.rollback())
    assert registry.active() == base
    assert seg.state.last_model_version.startswith("base@")
    assert image in viewer.layers


def test_cancel_segmentation_leaves_layers_intact(plugin, qtbot):
    viewer, seg, rev, exp, ft = plugin
    _wait(qtbot, seg.run(region=SMALL))
    dt = _layer(viewer, "Distal tubule")
    before = dt.data.copy()
    names = [lyr.name for lyr in viewer.layers]
    job = seg.run(region=(0, 0, 1024, 1024))
    qtbot.waitUntil(lambda: job.pbar.n > 0 or job.finished, timeout=60_000)
    seg.cancel()
    _wait(qtbot, job)
    from napari_omniseg.inference.engine import SegmentationCancelled

    assert isinstance(job.error, SegmentationCancelled)
    assert "cancelled" in seg.status.value
    assert [lyr.name for lyr in viewer.layers] == names
    np.testing.assert_array_equal(_layer(viewer, "Distal tubule").data, before)
    assert seg.state.region == SMALL and seg.state.busy == ""
    assert seg._run.enabled and not seg._cancel.enabled


def test_cancel_finetune_leaves_the_model_alone(plugin, qtbot, registry):
    viewer, seg, rev, exp, ft = plugin
    _wait(qtbot, seg.run(region=(0, 0, 512, 256)))
    rev.set_reviewed("distal_tubule")
    rev.commit()
    exp._patch.value = 128
    _wait(qtbot, exp.export())
    files = sorted(p.name for p in registry.root.iterdir())
    active = registry.active()
    dt_before = _layer(viewer, "Distal tubule").data.copy()
    ft._epochs.value = 5
    job = ft.start()
    qtbot.waitUntil(lambda: "Epoch" in ft._progress.value or job.finished, timeout=120_000)
    ft.cancel()
    _wait(qtbot, job)
    from napari_omniseg.training.loop import TrainingCancelled

    assert isinstance(job.error, TrainingCancelled)
    assert sorted(p.name for p in registry.root.iterdir()) == files
    assert registry.active() == active
    assert ft.result is None and not ft._activate.enabled
    np.testing.assert_array_equal(_layer(viewer, "Distal tubule").data, dt_before)
    assert seg.state.busy == "" and ft._run.enabled


def test_corrections_survive_a_crash(make_napari_viewer, registry, demo_dir, qtbot):
    viewer, seg, rev, exp, ft = _open(make_napari_viewer)
    _wait(qtbot, seg.run(region=SMALL))
    dt = _layer(viewer, "Distal tubule")
    dt.paint((30, 40), 1)
    dt.data_setitem((np.arange(200, 220), np.arange(10, 30)), 1)
    rev.set_reviewed("proximal_tubule")
    session = seg.state.session
    qtbot.waitUntil(lambda: not session.pending(), timeout=6000)  # the autosave happened
    expected = dt.data.copy()
    folder = session.folder
    # "crash": drop everything without saving or closing anything
    viewer.layers.clear()
    del viewer, seg, rev, exp, ft, dt, session
    viewer2, seg2, rev2, *_ = _open(make_napari_viewer)  # reopen the same image: a new viewer and widgets
    dt2 = _layer(viewer2, "Distal tubule")
    np.testing.assert_array_equal(dt2.data, expected)
    s2 = seg2.state.session
    assert s2.folder == folder and s2.regions["proximal_tubule"].reviewed
    assert rev2._rows["proximal_tubule"][0].value and not rev2._rows["distal_tubule"][0].value
    assert "Restored 2 working region(s)" in seg2.status.value


def test_whole_slide_estimate_then_store_then_edit_in_view(make_napari_viewer, registry, qtbot, demo_dir):
    from napari_omniseg._sample_data import build_renal_mosaic
    from napari_omniseg._widgets.review import ReviewWidget
    from napari_omniseg._widgets.segment import SCOPE_SLIDE, SegmentWidget
    from napari_omniseg.inference.engine import EngineConfig
    from napari_omniseg.labels.store import LabelStore

    img, _gt, _p = build_renal_mosaic(demo_dir)
    viewer = make_napari_viewer()
    image = viewer.add_image(img[:256, :384], name="crop", metadata={"mpp": 1.0, "slide_id": "crop-test"})
    seg, rev = SegmentWidget(viewer), ReviewWidget(viewer)
    viewer.window.add_dock_widget(seg)
    viewer.window.add_dock_widget(rev)
    seg.engine_config = EngineConfig(core=128, margin=16)
    seg.set_tissues(["distal_tubule"])
    job = _wait(qtbot, seg.run(scope=SCOPE_SLIDE))  # first press: the estimate only
    assert job.error is None, job.error
    assert "tiles to run" in seg.status.value and "Press Segment again" in seg.status.value
    assert seg.state.session.store_path == ""
    job = _wait(qtbot, seg.run(scope=SCOPE_SLIDE))  # second press: the run
    assert job.error is None, job.error
    session = seg.state.session
    store = LabelStore(session.store_path)
    assert store.complete and store.read("distal_tubule").shape == image.data.shape[:2]
    shown = [lyr for lyr in viewer.layers if lyr.metadata.get("omniseg", {}).get("kind") in ("store", "store-map")]
    # the complete map's box is unticked (the default): only the tissue's own layer is shown
    assert {lyr.metadata["omniseg"]["tissue"] for lyr in shown} == {"distal_tubule"}
    seg._map.value = True
    seg._show_store(image, store)
    shown = [lyr for lyr in viewer.layers if lyr.metadata.get("omniseg", {}).get("kind") in ("store", "store-map")]
    assert {lyr.metadata["omniseg"]["tissue"] for lyr in shown} == {"distal_tubule", "tissue_map"}
    assert not any(lyr.metadata.get("omniseg", {}).get("kind") == "working" for lyr in viewer.layers)
    # edit the part in view; commit writes it back into the store
    names = rev.edit_from_store(region=(128, 0, 128, 128))
    assert names == ["distal_tubule"]
    work = _layer(viewer, "Distal tubule")
    assert work.data.shape == (128, 128) and work.editable
    work.data_setitem((np.arange(0, 50), np.arange(0, 50)), 1)
    rev.set_reviewed("distal_tubule")
    (rec,) = rev.commit()
    assert rec.store_written
    np.testing.assert_array_equal(LabelStore(session.store_path).read("distal_tubule")[0:128, 128:256], work.data)
    assert image in viewer.layers


def test_field_of_view_and_rectangle_regions(make_napari_viewer):
    from napari_omniseg._widgets._regions import RegionError, fov_region, rect_region

    viewer = make_napari_viewer()
    image = viewer.add_image(np.zeros((400, 600, 3), np.uint8), scale=(0.5, 0.5), translate=(10, 20))
    viewer.reset_view()
    assert fov_region(viewer, image) == (0, 0, 600, 400)  # the whole image fits in the canvas
    from napari_omniseg._widgets._regions import camera

    camera(viewer).center = (10 + 100 * 0.5, 20 + 200 * 0.5)
    camera(viewer).zoom = 10.0  # screen px per world unit: 0.5 um/px -> 5 screen px per image px
    x, y, w, h = fov_region(viewer, image)
    ch, cw = viewer.canvas.size
    assert abs(w - cw / 5) <= 2 and abs(h - ch / 5) <= 2
    assert abs((x + w / 2) - 200) <= 1.5 and abs((y + h / 2) - 100) <= 1.5
    shapes = viewer.add_shapes([[[10 + 5, 20 + 10], [10 + 5, 20 + 60], [10 + 45, 20 + 60], [10 + 45, 20 + 10]]],
                               shape_type="rectangle")
    # pixels whose centres lie in the rectangle (napari: pixel j is centred on j)
    assert rect_region(shapes, image) == (20, 10, 101, 81)
    with pytest.raises(RegionError):
        rect_region(viewer.add_shapes(), image)


def test_clear_errors_in_the_ui(make_napari_viewer, registry, qtbot, monkeypatch):
    from napari_omniseg._widgets import _base
    from napari_omniseg._widgets.export import ExportWidget
    from napari_omniseg._widgets.finetune import FinetuneWidget
    from napari_omniseg._widgets.segment import SegmentWidget

    shown = []
    monkeypatch.setattr(_base, "show_error", shown.append)
    viewer = make_napari_viewer()
    seg, exp, ft = SegmentWidget(viewer), ExportWidget(viewer), FinetuneWidget(viewer)
    assert seg.run() is None and "Open an image first" in shown[-1]
    viewer.add_image(np.zeros((64, 64, 3), np.uint8), name="no-mpp")
    seg._image.reset_choices()
    assert seg.run() is None and "um/px" in shown[-1]
    assert exp.export() is None and "segment" in shown[-1]
    assert ft.start() is None and "export" in shown[-1].lower()
    seg.set_tissues([])
    assert seg.run() is None and "at least one tissue" in shown[-1]


def test_widgets_are_in_napari_menus(make_napari_viewer):
    from napari._app_model import get_app_model

    make_napari_viewer()
    menus = get_app_model().menus
    found = {}
    for mid in ("napari/layers/segment", "napari/layers/annotate", "napari/file/io_utilities"):
        found[mid] = {getattr(i, "command").id for i in menus.get_menu(mid) if hasattr(i, "command")}
    assert "napari-omniseg.segment_widget" in found["napari/layers/segment"]
    assert "napari-omniseg.review_widget" in found["napari/layers/annotate"]
    assert {"napari-omniseg.export_widget", "napari-omniseg.finetune_widget"} <= found["napari/file/io_utilities"]
