"""The Review widget: mark tissues reviewed, paint corrections, autosave, commit.

Painting happens in napari's own Labels tools on the tissue layers the Segment
widget made (label 1 = tissue, 0 = erase); undo/redo are napari's.  This widget
keeps the project folder up to date: it autosaves changed working regions on every
paint event and on a 1 s timer (which also catches undo and redo), at most every
``autosave_interval`` seconds per tissue, and never touches the layer's data or its
undo history.  *Commit* accepts the reviewed tissues' regions (and writes them into
the slide's label store when there is one).  Tissues not marked reviewed stay
*unknown* and are never exported as training data.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from magicgui.widgets import CheckBox, Container, Label, PushButton

from ..tissues import TISSUES, get_tissue
from ._base import OmnisegWidget, color_icon, describe_error, log, short_label
from ._layers import META_KEY, find_tissue_layer, show_region

if TYPE_CHECKING:
    import napari

AUTOSAVE_TICK_MS = 1000

#: the plugin's keys in the viewer (free in napari's defaults; listed in the user guide)
SHORTCUTS = {
    "Shift-N": ("next_tissue", "select the next tissue layer, ready to paint"),
    "Shift-B": ("previous_tissue", "select the previous tissue layer"),
    "Shift-R": ("toggle_reviewed", "mark the selected tissue reviewed (again: not reviewed)"),
    "Shift-C": ("commit", "commit the reviewed tissues"),
    "Shift-J": ("next_region", "go to the next region of the review queue and open it for painting"),
    "Shift-K": ("previous_region", "go back to the previous region of the review queue"),
}
QUEUE_FILE = "review-queue.json"  #: in the project folder: where the user is in the queue


class ReviewWidget(OmnisegWidget):
    """Review the segmentation tissue by tissue, correct it, commit what you reviewed."""

    def __init__(self, viewer: napari.viewer.Viewer):  # this exact annotation is how napari finds the viewer argument
        super().__init__(viewer)
        from qtpy.QtCore import QTimer

        self._project = Label(value="No project yet: segment a region first.")
        self._project.native.setWordWrap(True)
        self._rows: dict[str, tuple[CheckBox, Label]] = {}
        rows = []
        for t in TISSUES:
            cb = CheckBox(text=short_label(t), value=False, enabled=False)
            cb.tooltip = f"Tick when every {t.label.lower()} pixel of the region is right (its background too)"
            cb.native.setIcon(color_icon(t.color))
            info = Label(value="-")
            cb.changed.connect(lambda v, n=t.name: self._reviewed_changed(n, v))
            self._rows[t.name] = (cb, info)
            rows.append(Container(widgets=[cb, info], layout="horizontal", labels=False))
        self._table = Container(widgets=rows, labels=False)
        self._table_title = Label(value="Reviewed (tick when every pixel of the tissue in its region is right):")
        self._table_title.native.setWordWrap(True)
        self._hint = Label(value="Paint with label 1 to add tissue, 0 to erase; Ctrl+Z undoes.")
        self._hint.native.setWordWrap(True)
        self._commit = PushButton(text="Commit reviewed tissues")
        self._discard = PushButton(text="Discard edits of the selected layer")
        self._from_store = PushButton(text="Edit the region in view (whole-slide result)")
        self._save = PushButton(text="Save now")
        self._saved = Label(value="")
        self._prev_region = PushButton(text="< Previous")
        self._next_region = PushButton(text="Next region to review >")
        self._next_region.tooltip = ("The whole-slide result's most uncertain regions first (Shift+J / Shift+K); "
                                     "committed regions leave the queue")
        self._why = Label(value="")
        self._why.native.setWordWrap(True)
        queue_row = Container(widgets=[self._prev_region, self._next_region], layout="horizontal", labels=False)
        self._ft_now = PushButton(text="Export and fine-tune now", enabled=False)
        self._ft_now.tooltip = ("Export the committed corrections as training patches, then fine-tune the model on "
                                "them (the Export and Fine-tune widgets' own jobs, with their settings)")
        self.extend([self._project, self._table_title, self._table, self._hint, self._commit, self._discard, self._from_store,
                     queue_row, self._why, self._ft_now, self._save, self._saved, self.status])
        self._ft_now.changed.connect(lambda: self.finetune_now())
        self.chain_job = None
        self._next_region.changed.connect(lambda: self.next_region())
        self._prev_region.changed.connect(lambda: self.previous_region())
        self._queue = None  # cached ranking; dropped when a commit or a new result changes it
        self._commit.changed.connect(lambda: self.commit())
        self._discard.changed.connect(lambda: self.discard())
        self._from_store.changed.connect(lambda: self.edit_from_store())
        self._save.changed.connect(lambda: self.autosave(force=True))
        self._watched: set[int] = set()
        self.state.changed.connect(self._state_changed)
        self.viewer.layers.events.inserted.connect(lambda e: self._watch_layers())
        self._timer = QTimer(self.native)
        self._timer.setInterval(AUTOSAVE_TICK_MS)
        self._timer.timeout.connect(self.autosave)
        self._timer.start()
        from qtpy.QtWidgets import QApplication

        app = QApplication.instance()
        if app is not None:  # the last strokes before napari quits
            app.aboutToQuit.connect(self._save_on_quit)
        self._updating = False
        for key, (method, _help) in SHORTCUTS.items():
            viewer.bind_key(key, lambda _v, m=method: getattr(self, m)(), overwrite=True)
        self.refresh()

    # ------------------------------------------------------------------ state
    @property
    def session(self):
        return self.state.session

    def _state_changed(self, what: str) -> None:
        if what in ("commit", "store", "session"):
            self._queue = None
        self._watch_layers()
        self.refresh()

    def _watch_layers(self) -> None:
        """Autosave on every paint event of our working layers (connected once per layer)."""
        for lyr in self.viewer.layers:
            om = (getattr(lyr, "metadata", {}) or {}).get(META_KEY)
            if isinstance(om, dict) and om.get("kind") == "working" and id(lyr) not in self._watched:
                lyr.events.paint.connect(self._painted)
                self._watched.add(id(lyr))

    def _painted(self, event=None) -> None:
        self.autosave()
        self.refresh(counts=False)

    def refresh(self, counts: bool = True) -> None:
        s = self.session
        self._updating = True
        try:
            if s is None:
                self._project.value = "No project yet: segment a region first."
                for cb, info in self._rows.values():
                    cb.enabled = False
                    info.value = "-"
                return
            self._project.value = f"Project: {s.folder}"
            n_new = len(s.exportable())
            self._ft_now.enabled = n_new > 0
            self._ft_now.text = (f"Export {n_new} new correction(s) and fine-tune now" if n_new else
                                 "Export and fine-tune now (commit corrections first)")
            for name, (cb, info) in self._rows.items():
                wr = s.regions.get(name)
                cb.enabled = wr is not None
                cb.value = bool(wr and wr.reviewed)
                if wr is None:
                    info.value = "not segmented"
                    continue
                parts = []
                if counts:
                    try:
                        n = s.edited_pixels(name)
                        parts.append(f"{n} px edited" if n else "as predicted")
                    except Exception:  # noqa: BLE001
                        pass
                if wr.has_uncommitted_edits():
                    parts.append("to commit")
                committed = [c for c in s.commits if c.tissue == name and not c.superseded]
                if committed:
                    parts.append(f"{len(committed)} committed")
                info.value = ", ".join(parts) or "-"
        finally:
            self._updating = False

    def _reviewed_changed(self, name: str, value: bool) -> None:
        if self._updating or self.session is None or name not in self.session.regions:
            return
        try:
            self.session.set_reviewed(name, bool(value))
        except Exception as e:  # noqa: BLE001
            self.error(describe_error(e))
            return
        self.state.changed.emit("reviewed")

    def set_reviewed(self, name: str, value: bool = True) -> None:
        """Mark a tissue reviewed (same as ticking its box)."""
        t = get_tissue(name)
        cb, _ = self._rows[t.name]
        if cb.value != bool(value):
            cb.value = bool(value)
        elif self.session is not None:
            self._reviewed_changed(t.name, bool(value))

    # ------------------------------------------------------------------ keyboard
    def _working_layers(self):
        order = {t.name: i for i, t in enumerate(TISSUES)}
        out = []
        for lyr in self.viewer.layers:
            om = (getattr(lyr, "metadata", {}) or {}).get(META_KEY)
            if isinstance(om, dict) and om.get("kind") == "working" and om.get("tissue") in order:
                out.append((order[om["tissue"]], lyr))
        return [lyr for _i, lyr in sorted(out, key=lambda p: p[0])]

    def _step_tissue(self, step: int):
        layers = self._working_layers()
        if not layers:
            self.error("No tissue layers to review: segment a region first.")
            return None
        active = self.viewer.layers.selection.active
        i = layers.index(active) if active in layers else (-1 if step > 0 else 0)
        lyr = layers[(i + step) % len(layers)]
        lyr.visible = True
        self.viewer.layers.selection.active = lyr
        lyr.mode = "paint"
        self.set_status(f"{lyr.name}: paint with label 1, erase with 0; Shift+R marks it reviewed.")
        return lyr

    def next_tissue(self):
        """Select the next tissue layer (registry order) in paint mode."""
        return self._step_tissue(+1)

    def previous_tissue(self):
        return self._step_tissue(-1)

    def toggle_reviewed(self):
        """Mark the selected tissue layer reviewed, or not reviewed if it was."""
        lyr = self.viewer.layers.selection.active
        om = (getattr(lyr, "metadata", {}) or {}).get(META_KEY) if lyr is not None else None
        if not isinstance(om, dict) or om.get("kind") != "working" or self.session is None \
                or om.get("tissue") not in self.session.regions:
            self.error("Select a tissue layer first (Shift+N).")
            return None
        name = om["tissue"]
        value = not self.session.regions[name].reviewed
        self.set_reviewed(name, value)
        self.set_status(f"{lyr.name}: {'reviewed' if value else 'not reviewed'}.")
        return value

    # ------------------------------------------------------------------ fine-tune after review
    def finetune_now(self):
        """Export the new commits, then start the Fine-tune widget's job on them.

        Both steps run in the background as the two widgets run them (opened in the
        dock if they are not); returns the export job."""
        from qtpy.QtCore import QTimer

        s = self.session
        if s is None or not s.exportable():
            self.error("Nothing new to learn from: mark tissues reviewed and commit them first.")
            return None
        _, exp = self.viewer.window.add_plugin_dock_widget("napari-omniseg", "Export training data")
        _, ft = self.viewer.window.add_plugin_dock_widget("napari-omniseg", "Fine-tune")
        job = exp.export()
        if job is None:
            return None
        self.set_status("Exporting the corrections; fine-tuning starts when the export is done...")
        timer = QTimer(self.native)
        timer.setInterval(200)

        def check():
            if not job.finished:
                return
            timer.stop()
            if job.error is not None:
                self.error(f"Export failed, so no fine-tune was started: {describe_error(job.error)}")
                return
            self.chain_job = ft.start()
            if self.chain_job is not None:
                self.info("Fine-tuning on the exported corrections: follow it in the Fine-tune widget.")

        timer.timeout.connect(check)
        timer.start()
        return job

    # ------------------------------------------------------------------ review queue
    def review_queue(self):
        """The ranked regions of the project's whole-slide result (labels/review.py)."""
        from pathlib import Path

        from ..labels.review import suggest
        from ..labels.store import LabelStore

        s = self.session
        if s is None or not s.store_path or not Path(s.store_path).exists():
            return None
        if self._queue is None:
            reviewed = [(c.tissue, tuple(c.region)) for c in s.commits if c.reviewed]
            self._queue = suggest(LabelStore(s.store_path), n=100, reviewed=reviewed)
        return self._queue

    def _queue_position(self) -> tuple[int, str]:
        import json

        try:
            d = json.loads((self.session.folder / QUEUE_FILE).read_text())
            return int(d.get("position", -1)), str(d.get("key", ""))
        except (OSError, ValueError, AttributeError, TypeError):
            return -1, ""

    def _save_queue_position(self, pos: int, key: str) -> None:
        import json

        from .._io import atomic_write_bytes

        try:
            atomic_write_bytes(self.session.folder / QUEUE_FILE, json.dumps({"position": pos, "key": key}).encode())
        except OSError:
            log.exception("could not save the review-queue position")

    def next_region(self, step: int = 1):
        """Move the viewer to the next (``step`` > 0) or previous region of the queue,
        open it for painting and say why it was chosen; returns the suggestion."""
        q = self.review_queue()
        if q is None:
            self.error("No whole-slide result in this project: run Segment with scope 'Whole slide' first; "
                       "the queue ranks its regions.")
            return None
        if not q:
            self._why.value = "Nothing left in the review queue."
            self.info("Nothing left to review: every ranked region is committed.")
            return None
        pos, key = self._queue_position()
        keys = [x.key for x in q]
        if pos < 0:
            pos = 0
        elif key in keys:
            pos = keys.index(key) + step
        else:  # the region shown last left the queue (committed): the one now in its place is next
            pos = pos if step > 0 else pos - 1
        pos = min(len(q) - 1, max(0, pos))
        sug = q[pos]
        if not self.edit_from_store(region=sug.box):
            return None  # the message (e.g. uncommitted corrections) is shown already
        self._look_at(sug.box)
        lyr = find_tissue_layer(self.viewer, sug.tissue)
        if lyr is not None:
            lyr.visible = True
            self.viewer.layers.selection.active = lyr
            lyr.mode = "paint"
        self._save_queue_position(pos, sug.key)
        self._why.value = f"{pos + 1} of {len(q)}: {sug.why()}"
        return sug

    def previous_region(self):
        return self.next_region(-1)

    def _look_at(self, box) -> None:
        """Centre the camera on a level-0 box of the slide and zoom so that it fills the canvas."""
        from ._regions import camera

        layer = self.state.image_layer
        if layer is None:
            return
        x, y, w, h = box
        sy, sx = (float(v) for v in layer.scale[-2:])
        ty, tx = (float(v) for v in layer.translate[-2:])
        cam = camera(self.viewer)
        cam.center = (ty + sy * (y + h / 2), tx + sx * (x + w / 2))
        ch, cw = self.viewer.canvas.size
        cam.zoom = 0.9 * min(ch / (sy * h), cw / (sx * w))

    # ------------------------------------------------------------------ autosave
    def _save_on_quit(self) -> None:
        s = self.session
        if s is not None:
            try:
                s.save()
            except Exception:  # noqa: BLE001 - nothing can be shown any more at this point
                log.exception("could not save corrections on quit")

    def autosave(self, force: bool = False) -> list[str]:
        s = self.session
        if s is None:
            return []
        try:
            saved = s.save() if force else s.poll()
        except Exception as e:  # noqa: BLE001 - keep painting even if the disk is full; say so
            log.exception("autosave failed")
            self.error(f"Autosave failed ({describe_error(e)}); your edits are still in the viewer, free some "
                       "disk space or choose another project folder")
            return []
        if saved:
            self._saved.value = f"Autosaved {', '.join(saved)} at {time.strftime('%H:%M:%S')}"
            self.refresh()  # undo/redo change the array without a paint event: rows follow the save
        return saved

    # ------------------------------------------------------------------ actions
    def commit(self, names=None):
        s = self.session
        if s is None:
            self.error("Nothing to commit: segment a region first.")
            return []
        if not names and not any(r.reviewed for r in s.regions.values()):
            self.error("Mark the tissues you reviewed first (tick their boxes); only reviewed tissues are committed.")
            return []
        try:
            recs = s.commit(list(names) if names else None)
        except Exception as e:  # noqa: BLE001
            log.exception("commit failed")
            self.error(f"Commit failed: {describe_error(e)}")
            return []
        if not recs:
            self.info("Nothing new to commit: the reviewed tissues' regions are committed already.")
            return []
        stored = [r.tissue for r in recs if r.store_written]
        self.info(f"Committed {', '.join(r.tissue for r in recs)}" +
                  (f" (also written to the label store: {', '.join(stored)})" if stored else "") +
                  ". Export them as training data next.")
        self.refresh()
        self.state.changed.emit("commit")
        return recs

    def discard(self, name: str | None = None):
        s = self.session
        if s is None:
            return
        if name is None:
            lyr = self.viewer.layers.selection.active
            om = (getattr(lyr, "metadata", {}) or {}).get(META_KEY) if lyr is not None else None
            if not isinstance(om, dict) or om.get("kind") != "working":
                self.error("Select a tissue layer first.")
                return
            name = om["tissue"]
        try:
            s.discard(name)
        except Exception as e:  # noqa: BLE001
            self.error(describe_error(e))
            return
        lyr = find_tissue_layer(self.viewer, name)
        if lyr is not None:
            lyr.refresh()
        self.info(f"{get_tissue(name).label}: edits discarded, back to the model's prediction.")
        self.refresh()
        self.state.changed.emit("regions")

    def edit_from_store(self, region=None):
        """Copy the field of view of a whole-slide result into editable working regions."""
        from pathlib import Path

        from ..labels.store import LabelStore
        from ._regions import RegionError, fov_region
        from .segment import layer_meta

        s, st = self.session, self.state
        if s is None or not s.store_path or not Path(s.store_path).exists():
            self.error("No whole-slide result in this project: run Segment with scope 'Whole slide' first.")
            return []
        layer = st.image_layer
        try:
            region = region or fov_region(self.viewer, layer)
        except RegionError as e:
            self.error(describe_error(e))
            return []
        store = LabelStore(s.store_path)
        names = [n for n in store.tissue_names if store.has(n)]
        busy = s.uncommitted(names)
        if busy:
            self.error("Uncommitted corrections in " + ", ".join(busy) + ": commit or discard them first.")
            return []
        x, y, w, h = region
        mpp0 = float(store.meta["level0_mpp"])
        out = []
        for n in names:
            t = get_tissue(n)
            f = store.mpp(n) / mpp0
            arr = store.level(n, 0)
            y0, x0 = int(y / f), int(x / f)
            y1, x1 = min(arr.shape[0], int(np.ceil((y + h) / f))), min(arr.shape[1], int(np.ceil((x + w) / f)))
            data = np.array(arr[y0:y1, x0:x1], dtype=np.uint8)
            wr = s.set_region(t, data, (y0, x0), f, store.mpp(n), region, str(store.meta.get("model_version", "")))
            show_region(self.viewer, layer, wr, layer_meta(s, st.source))
            out.append(n)
        st.region, st.tissues = tuple(region), out
        hidden = []
        for lyr in self.viewer.layers:  # one colour per tissue: the whole-slide layer under its editable copy hides
            om = (getattr(lyr, "metadata", {}) or {}).get(META_KEY)
            if isinstance(om, dict) and om.get("kind") in ("store", "store-map") and lyr.visible \
                    and (om.get("tissue") in out or om.get("kind") == "store-map"):
                lyr.visible = False
                hidden.append(lyr.name)
        self.info(f"Editing {len(out)} tissue(s) over {w} x {h} px; commit writes them back to {Path(s.store_path).name}."
                  + (f" Hidden while you edit: {', '.join(hidden)} (tick them in the layer list to compare)."
                     if hidden else ""))
        st.changed.emit("regions")
        return out
