"""The Segment widget: choose image, tissues, scope, model and device; run in the background.

Thin by design: the work is :func:`napari_omniseg.inference.engine.segment_region`
(a field of view or a drawn rectangle, into memory) and
:func:`napari_omniseg.inference.run.segment_to_store` (the whole slide, into an
OME-Zarr label store in the project folder, after an estimate of the time).
Results become one Labels layer per tissue, named after it and drawn in its
colour, placed over the slide; running again updates those layers in place.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from magicgui.widgets import CheckBox, ComboBox, Container, FloatSpinBox, LineEdit, PushButton, RadioButtons, SpinBox

from ..tissues import TISSUES, get_tissue
from ._base import OmnisegWidget, background_threads, color_icon, describe_error, log, short_label
from ._layers import META_KEY, MAP_LAYER, colormap, compose, complete_map_of, find_map_layer, map_color_dict, outline_container, show_region
from ._regions import RegionError, fov_region, rect_region, whole_region

if TYPE_CHECKING:
    import napari

SCOPE_FOV = "Field of view"
SCOPE_RECT = "Drawn rectangle"
SCOPE_SLIDE = "Whole slide"
ACTIVE = "active"
RECT_LAYER = "omniseg region"


def fmt_seconds(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def layer_meta(session, src) -> dict:
    """What a tissue layer records so writers can place it on the slide."""
    return {"project": str(session.folder), "level0_shape": [int(v) for v in src.shapes[0]],
            "level0_mpp": float(src.mpp), "slide": session.slide.path or session.slide.id}


def _threads_here(seg) -> None:
    """Apply the engine's CPU thread count in the calling (worker) thread."""
    n = int(getattr(seg.cfg, "threads", 0) or 0)
    if n:
        import torch

        torch.set_num_threads(n)


def _has_tissue_mask() -> bool:
    try:
        from ..slides import tissue_mask  # noqa: F401
    except ImportError:
        return False
    return True


class SegmentWidget(OmnisegWidget):
    """Segment kidney tissues in the field of view, a drawn rectangle or the whole slide."""

    def __init__(self, viewer: napari.viewer.Viewer):  # this exact annotation is how napari finds the viewer argument
        super().__init__(viewer)
        from napari.layers import Image, Shapes

        self.engine_config = None  #: an EngineConfig overriding the widget's settings (tests, scripts)
        self._image = ComboBox(label="Image", choices=self.layer_choices(Image))
        self._mpp = FloatSpinBox(label="um/px (0: as recorded)", value=0.0, min=0.0, max=1000.0, step=0.001,
                                 tooltip="Microns per pixel of the image, only when the file does not record it (0 = from the file)")
        self._tissue_boxes: dict[str, CheckBox] = {}
        for t in TISSUES:
            cb = CheckBox(text=f"{short_label(t)} ({t.magnification}x)", value=True)
            cb.tooltip = f"{t.label}: segmented at {t.magnification}x ({t.mpp:g} um/px)"
            cb.native.setIcon(color_icon(t.color))
            self._tissue_boxes[t.name] = cb
        self._tissues = Container(widgets=list(self._tissue_boxes.values()), label="Tissues")
        self._tissues.margins = (0, 0, 0, 0)
        self._scope = RadioButtons(label="Scope", choices=[SCOPE_FOV, SCOPE_RECT, SCOPE_SLIDE], value=SCOPE_FOV)
        self._shapes = ComboBox(label="Rectangle layer", choices=self.layer_choices(Shapes), nullable=True)
        self._draw = PushButton(text="Draw a rectangle")
        self._ckpt = ComboBox(label="Model", choices=self._checkpoint_choices)
        self._device = ComboBox(label="Device", choices=["auto", "cpu", "cuda", "mps"], value="auto")
        self._precision = ComboBox(label="Precision", choices=["auto", "fp32", "bf16", "fp16"], value="auto",
                                   tooltip="auto: bf16 on GPUs and on CPUs with AMX/AVX-512 bf16, fp32 elsewhere; "
                                           "fp16 only on CUDA")
        self._block = ComboBox(label="Block (px)", choices=[128, 256, 512], value=256,
                               tooltip="Output block side in model pixels; smaller blocks give more frequent progress")
        self._threads = SpinBox(label="CPU threads", value=background_threads(), min=1, max=256,
                                tooltip="torch threads for the model on CPU; one core is left free by default so the "
                                        "viewer stays responsive")
        self._map = CheckBox(text="Also show the complete label map", value=False)
        self._project = LineEdit(label="Project folder", value="")
        self._project.native.setPlaceholderText("automatic: <slide>.omniseg")
        self._run = PushButton(text="Segment")
        self._cancel = PushButton(text="Cancel", enabled=False)
        self.extend([self._image, self._mpp, self._tissues, self._scope, self._shapes, self._draw, self._ckpt,
                     self._device, self._precision, self._block, self._threads, self._map, self._project,
                     Container(widgets=[self._run, self._cancel], layout="horizontal", labels=False), self.status])
        self._run.changed.connect(lambda: self.run())
        self._cancel.changed.connect(self.cancel)
        self._draw.changed.connect(self.draw_rectangle)
        self._image.changed.connect(self._image_changed)
        self.state.changed.connect(self._state_changed)
        self.watch_layers(self._image, self._shapes)
        self.job = None
        self._estimate_key = None
        self._sources: dict = {}
        self.state.segment_widget = self
        self._image_changed()

    # ------------------------------------------------------------------ choices
    def _checkpoint_choices(self, _w=None):
        from ..model.checkpoint import CheckpointError
        from ..model.registry import ModelRegistry

        reg = ModelRegistry()
        try:
            act = reg.active()
        except CheckpointError as e:
            log.warning("%s", e)
            act = None
        out = [(f"active ({act.stem})" if act else "active (none yet)", ACTIVE)]
        for p in reversed(reg.versions()):
            out.append((p.stem, str(p)))
        return out

    def refresh_models(self) -> None:
        self._ckpt.reset_choices()

    def checkpoint_path(self) -> Path:
        from ..model.registry import ModelRegistry, resolve_checkpoint

        v = self._ckpt.value
        return resolve_checkpoint(None if v in (None, ACTIVE) else v, ModelRegistry())

    def selected_tissues(self) -> list[str]:
        return [n for n, cb in self._tissue_boxes.items() if cb.value]

    def set_tissues(self, names) -> None:
        names = set(names)
        for n, cb in self._tissue_boxes.items():
            cb.value = n in names

    def _engine(self, device: str):
        from ..inference.engine import EngineConfig

        if self.engine_config is not None:
            return self.engine_config
        core = int(self._block.value)
        return EngineConfig(core=core, margin=max(8, core // 8), device=device,
                            precision=str(self._precision.value), skip_background=_has_tissue_mask(), threads=int(self._threads.value))

    # ------------------------------------------------------------------ image / project
    def source_for(self, layer):
        from ._sources import open_layer_source

        mpp = float(self._mpp.value) or None
        key = (id(layer), layer.name, mpp)
        src = self._sources.get(key)
        if src is None:
            src = open_layer_source(layer, mpp)
            self._sources = {key: src}
        return src

    def project_dir(self, layer) -> Path:
        from ..corrections import default_project_dir

        if self._project.value.strip():
            return Path(self._project.value.strip()).expanduser()
        md = layer.metadata or {}
        return default_project_dir(md.get("path") or None, name=md.get("slide_id") or layer.name)

    def open_project(self, layer, src=None, create: bool = True):
        """The correction session of ``layer`` (opened, restored onto the viewer, or created)."""
        from ..corrections import CorrectionSession, SlideInfo

        folder = self.project_dir(layer)
        st = self.state
        if st.session is not None and Path(st.session.folder) == folder and st.image_layer is layer:
            return st.session
        if not create and not (folder / "session.json").exists():
            return None
        src = src or self.source_for(layer)
        md = layer.metadata or {}
        path = str(md.get("path") or "")
        info = SlideInfo(path or str(md.get("slide_id") or layer.name), tuple(src.shapes[0]), float(src.mpp), path)
        session = CorrectionSession.open(folder, info)
        if st.session is not None:
            try:  # the previous image's last strokes, before its session is let go
                st.session.save()
            except Exception as e:  # noqa: BLE001
                self.error(f"Could not save the corrections of the previous image: {describe_error(e)}")
        st.session, st.image_layer, st.source = session, layer, src
        for wr in session.regions.values():
            show_region(self.viewer, layer, wr, layer_meta(session, src))
        if session.regions:
            st.region = next(iter(session.regions.values())).region
            st.tissues = list(session.regions)
            self.set_status(f"Restored {len(session.regions)} working region(s) from {folder}")
        st.changed.emit("session")
        return session

    def _image_changed(self, *_):
        layer = self._image.value
        if layer is None:
            return
        # tissues the image is too coarse for start unchecked (they would be upsampled)
        from ._sources import layer_mpp

        mpp = layer_mpp(layer, float(self._mpp.value) or None)
        if mpp:
            for t in TISSUES:
                self._tissue_boxes[t.name].value = t.mpp >= mpp * 0.99
        try:
            self.open_project(layer, create=False)
        except Exception as e:  # noqa: BLE001 - an unreadable project must not break the widget
            self.error(f"Could not restore the corrections of {layer.name}: {describe_error(e)}")

    def _state_changed(self, what: str) -> None:
        if what == "model":
            self.refresh_models()

    def draw_rectangle(self, *_):
        from napari.layers import Shapes

        lyr = next((l for l in self.viewer.layers if isinstance(l, Shapes) and l.name == RECT_LAYER), None)
        if lyr is None:
            # in the image's units (microns for a slide), so napari sees one unit system
            img = self._image.value
            units = {"units": tuple(img.units[-2:])} if img is not None else {}
            lyr = self.viewer.add_shapes(name=RECT_LAYER, edge_color="yellow", face_color="transparent", edge_width=2,
                                         **units)
        self.viewer.layers.selection.active = lyr
        lyr.mode = "add_rectangle"
        self._shapes.reset_choices()
        self._shapes.value = lyr
        self._scope.value = SCOPE_RECT
        self.set_status("Drag a rectangle on the image, then press Segment.")

    # ------------------------------------------------------------------ run
    def region_for(self, scope: str, layer) -> tuple[int, int, int, int]:
        if scope == SCOPE_FOV:
            return fov_region(self.viewer, layer)
        if scope == SCOPE_RECT:
            return rect_region(self._shapes.value, layer)
        return whole_region(layer)

    def run(self, scope: str | None = None, region=None, tissues=None):
        """Start a segmentation; returns the background job (or None with a message when it cannot start)."""
        from ..corrections import SessionError
        from ..model.checkpoint import CheckpointError
        from ._sources import SourceError

        if self.state.busy:
            self.error(f"Wait for the {self.state.busy} to finish (or cancel it) first.")
            return None
        layer = self._image.value
        if layer is None:
            self.error("Open an image first (File > Open, or File > Open Sample > napari-omniseg).")
            return None
        scope = scope or self._scope.value
        names = list(tissues) if tissues else self.selected_tissues()
        if not names:
            self.error("Choose at least one tissue.")
            return None
        try:
            src = self.source_for(layer)
            session = self.open_project(layer, src)
            if region is None:
                region = self.region_for(scope, layer)
            ckpt_path = self.checkpoint_path()
            device = self._device.value
            seg = self.state.segmenter(ckpt_path, device, self._engine(device))
        except (SourceError, RegionError, CheckpointError, SessionError, OSError, ValueError) as e:
            self.error(describe_error(e))
            return None
        if scope == SCOPE_SLIDE:
            return self._run_slide(layer, src, session, seg, names)
        busy = session.uncommitted(names)
        if busy:
            self.error("Uncommitted corrections in " + ", ".join(busy) +
                       ": commit them (Review: mark reviewed, Commit) or discard them before segmenting again.")
            return None
        return self._run_region(layer, src, session, seg, names, tuple(int(v) for v in region))

    def _start(self, name, fn, on_done, total=0):
        from ._jobs import start_job

        self.state.busy = "segmentation"
        self._run.enabled = False
        self._cancel.enabled = True

        def fin():
            self.state.busy = ""
            self._run.enabled = True
            self._cancel.enabled = False

        self.job = start_job(name, fn, on_progress=self._progress, on_done=on_done, on_error=self._failed,
                             on_finally=fin, total=total)
        return self.job

    def _run_region(self, layer, src, session, seg, names, region):
        from ..inference.engine import segment_region

        plans = seg.plans(src, names, region)
        n = sum(len(p.tiles) for p in plans)
        x, y, w, h = region
        self.set_status(f"Segmenting {w} x {h} px ({w * src.mpp / 1000:.2f} x {h * src.mpp / 1000:.2f} mm), "
                        f"{len(names)} tissue(s), {n} tiles...")
        t0 = time.perf_counter()

        def work(on_progress, should_stop):
            _threads_here(seg)
            return segment_region(seg, src, region, names, on_progress, should_stop)

        def done(res):
            self._apply_region(layer, session, seg, names, region, res, time.perf_counter() - t0)

        return self._start("Segmenting", work, done, total=n)

    def _apply_region(self, layer, session, seg, names, region, res, seconds):
        from ..corrections import UncommittedEditsError

        labels, rep = res
        st = self.state
        failed = []
        for name in names:
            rl = labels.get(name)
            if rl is None:
                continue
            try:
                wr = session.set_region(rl.tissue, rl.data, rl.origin, rl.factor, rl.mpp, region, seg.ckpt.version)
            except UncommittedEditsError as e:  # painted while the run was going
                failed.append(describe_error(e))
                continue
            show_region(self.viewer, layer, wr, layer_meta(session, self.state.source))
        if self._map.value and session.regions:
            regs = {n: session.regions[n] for n in names if n in session.regions}
            m, f, origin = complete_map_of(regs, seg.ckpt.tissues)
            s0 = (f, f)
            t0 = ((origin[0] + 0.5) * f - 0.5, (origin[1] + 0.5) * f - 0.5)
            scale, translate = compose(layer, s0, t0)
            lyr = find_map_layer(self.viewer, layer)
            om = {META_KEY: {"kind": "map", "image": layer.name}}
            if lyr is None:
                lyr = self.viewer.add_labels(m, name=MAP_LAYER, scale=scale, translate=translate, opacity=0.5,
                                             colormap=colormap(map_color_dict(seg.ckpt.tissues)), metadata=om,
                                             units=layer.units[-2:])
            else:
                lyr.scale, lyr.translate, lyr.data = scale, translate, m
            lyr.editable = False
        st.region, st.tissues = region, list(names)
        st.last_model_version = seg.ckpt.version
        st.last_checkpoint = seg.ckpt.path
        st.last_report = rep
        if rep.tiles_run:
            st.seconds_per_tile["region"] = rep.model_seconds / rep.tiles_run
        msg = (f"Done in {seconds:.1f} s with {seg.ckpt.version}: {rep.tiles_run} tiles run, "
               f"{rep.tiles_skipped} background tiles skipped")
        if rep.tiles_failed:
            msg += f", {len(rep.tiles_failed)} tiles with unreadable parts (those parts marked unknown, grey)"
        self.set_status(msg + ("; " + "; ".join(failed) if failed else "."))
        if failed:
            self.error("; ".join(failed))
        st.changed.emit("regions")

    def _run_slide(self, layer, src, session, seg, names):
        from ..corrections.session import safe_name
        from ..inference.run import estimate, segment_to_store

        key = (id(layer), tuple(names), seg.ckpt.version, tuple(src.shapes[0]))
        if self._estimate_key != key:
            def work(on_progress, should_stop):
                _threads_here(seg)
                on_progress({"phase": "estimate"})
                return estimate(seg, src, names)

            def done(est):
                self._estimate_key = key
                per = est.get("per_magnification", {})
                spt = ", ".join(f"{m}x: {v['tiles']} tiles at {v['seconds_per_tile']:.2f} s/tile"
                                for m, v in sorted(per.items()))
                self.state.seconds_per_tile.update({m: v["seconds_per_tile"] for m, v in per.items()})
                self.set_status(
                    f"Whole slide: {est['tiles']} tiles to run ({est['tiles_background']} background tiles skipped); "
                    f"about {fmt_seconds(est['seconds'])} on this machine ({spt}). Press Segment again to start.")

            self.set_status("Measuring the model's speed on this slide...")
            return self._start("Estimating", work, done)
        self._estimate_key = None
        out = Path(session.folder) / f"segmentation-{safe_name(seg.ckpt.version)}.ome.zarr"
        n = sum(len(p.tiles) for p in seg.plans(src, names, None))

        def work(on_progress, should_stop):
            _threads_here(seg)
            return segment_to_store(seg, src, out, names, None, on_progress, should_stop)

        def done(res):
            store, rep = res
            session.store_path = str(out)
            session._write_state()
            self._show_store(layer, store)
            self.state.last_model_version = seg.ckpt.version
            self.state.last_checkpoint = seg.ckpt.path
            self.state.last_report = rep
            self.set_status(f"Whole slide done in {fmt_seconds(rep.seconds)}: {rep.tiles_run} tiles run, "
                            f"{rep.tiles_skipped} skipped; saved to {out}. To correct, zoom in and use "
                            "Review > Edit the region in view.")
            self.state.changed.emit("store")

        return self._start("Segmenting the whole slide", work, done, total=n)

    def _show_store(self, layer, store):
        from .._reader import store_layer_data

        for data, kw, _kind in store_layer_data(store):
            om = kw["metadata"][META_KEY]
            name = om["tissue"]
            if om.get("kind") == "store-map" and not self._map.value:
                continue  # the complete map only when its box is ticked, as for regions
            om["image"] = layer.name
            # the store is in microns; the image layer may not be
            s_img = float(layer.scale[-1])
            mpp0 = float(store.meta["level0_mpp"])
            k = s_img / mpp0
            scale = tuple(v * k for v in kw["scale"])
            translate = tuple(v * k + float(t) for v, t in zip(kw["translate"], layer.translate[-2:]))
            existing = next((l for l in self.viewer.layers
                             if (l.metadata or {}).get(META_KEY, {}).get("kind") in ("store", "store-map")
                             and l.metadata[META_KEY].get("tissue") == name
                             and l.metadata[META_KEY].get("image") == layer.name), None)
            if existing is not None:
                self.viewer.layers.remove(existing)
            added = self.viewer.add_labels(data, name=f"{kw['name']} (whole slide)", scale=scale, translate=translate,
                                           multiscale=kw["multiscale"], colormap=kw["colormap"],
                                           opacity=kw.get("opacity", 0.5), metadata=kw["metadata"], units=layer.units[-2:])
            if om.get("kind") == "store":
                try:
                    outline_container(added, get_tissue(name))
                except Exception:  # noqa: BLE001 - a tissue the registry does not know: drawn filled
                    pass

    def _progress(self, ev: dict) -> None:
        if ev.get("phase") == "segment":
            self.set_status(f"Segmenting: {ev.get('done', 0)} / {ev.get('total', 0)} tiles "
                            f"({ev.get('magnification', '')}x)")

    def _failed(self, e: BaseException) -> None:
        from ..inference.engine import SegmentationCancelled

        if isinstance(e, SegmentationCancelled):
            self.info("Segmentation cancelled; the layers are as they were.")
        else:
            log.exception("segmentation failed", exc_info=e)
            self.error(f"Segmentation failed: {describe_error(e)}")

    def cancel(self, *_):
        if self.job is not None and self.job.running:
            self.job.cancel()
            self.set_status("Cancelling...")

