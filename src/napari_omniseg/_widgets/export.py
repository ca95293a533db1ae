"""The Export widget: committed, reviewed corrections -> training patches; QuPath GeoJSON.

The work is :func:`napari_omniseg.corrections.export_corrections` (patches at each
tissue's magnification, 0/255 masks, manifest rows appended atomically, never
overwriting) and :func:`napari_omniseg._writer.write_regions_geojson`.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from magicgui.widgets import CheckBox, ComboBox, Container, FloatSpinBox, Label, LineEdit, PushButton

from ._base import OmnisegWidget, describe_error, log

if TYPE_CHECKING:
    import napari


class ExportWidget(OmnisegWidget):
    """Export reviewed corrections as training data, or the tissues as QuPath GeoJSON."""

    def __init__(self, viewer: napari.viewer.Viewer):  # this exact annotation is how napari finds the viewer argument
        super().__init__(viewer)
        self._out = LineEdit(label="Training folder", value="")
        self._out.native.setPlaceholderText("automatic: <project>/training")
        self._patch = ComboBox(label="Patch (px)", choices=[128, 256, 512], value=256)
        self._stain = ComboBox(label="Stain", choices=["", "he", "pas", "sil", "tri"], value="")
        self._val = FloatSpinBox(label="Held out", value=0.2, min=0.0, max=0.5, step=0.05,
                                 tooltip="Fraction of each tissue's patches kept for validation (split 'val')")
        self._pending = Label(value="")
        self._pending.native.setWordWrap(True)
        self._export = PushButton(text="Export training patches")
        self._geo_path = LineEdit(label="GeoJSON file", value="")
        self._geo_path.native.setPlaceholderText("automatic: <project>/<slide>.geojson")
        self._geo_reviewed = CheckBox(text="Only reviewed tissues", value=True)
        self._geo = PushButton(text="Write QuPath GeoJSON")
        self.extend([self._out, self._patch, self._stain, self._val, self._pending, self._export,
                     Container(widgets=[self._geo_path, self._geo_reviewed, self._geo], label="QuPath"),
                     self.status])
        self._export.changed.connect(lambda: self.export())
        self._geo.changed.connect(lambda: self.write_geojson())
        self.state.changed.connect(lambda what: self.refresh())
        self.job = None
        self.last_result = None
        self.refresh()

    def out_dir(self) -> Path | None:
        if self._out.value.strip():
            return Path(self._out.value.strip()).expanduser()
        s = self.state.session
        return s.training_dir if s is not None else None

    def refresh(self) -> None:
        s = self.state.session
        if s is None:
            self._pending.value = "No project yet: segment, review and commit a region first."
            return
        todo = s.exportable()
        per = Counter(c.tissue for c in todo)
        lines = ["Ready to export: " + (", ".join(f"{k} ({v} region(s))" for k, v in sorted(per.items()))
                                        if per else "nothing (commit reviewed tissues first)")]
        out = self.out_dir()
        if out is not None and (out / "manifest.csv").exists():
            from ..training.manifest import read_manifest_rows

            rows = read_manifest_rows(out / "manifest.csv")
            c = Counter((r.get("tissue", ""), r.get("split", "")) for r in rows)
            tissues = sorted({t for t, _ in c})
            lines.append("Exported so far: " + ", ".join(
                f"{t} {c[(t, 'train')]} train + {c[(t, 'val')]} val" for t in tissues))
        self._pending.value = "\n".join(lines)

    def export(self):
        """Start exporting in the background; returns the job (None if there is nothing to do)."""
        from ._jobs import start_job

        s, st = self.state.session, self.state
        if s is None or st.source is None:
            self.error("No project yet: segment, review and commit a region first.")
            return None
        if st.busy:
            self.error(f"Wait for the {st.busy} to finish first.")
            return None
        if not s.exportable():
            done = [c for c in s.commits if c.exported and not c.superseded]
            if done:
                n = sum(c.export_rows for c in done)
                self.info(f"Everything committed is exported already ({len(done)} commit(s), {n} patch(es) in "
                          f"{self.out_dir()}); commit new corrections to export more.")
            else:
                self.error("Nothing to export: mark tissues reviewed and commit them in the Review widget first.")
            return None
        from ..corrections import export_corrections

        out, patch, stain, val = self.out_dir(), int(self._patch.value), self._stain.value, float(self._val.value)
        src = st.source

        def work(on_progress, should_stop):
            return export_corrections(s, src, out, patch=patch, val_fraction=val, stain=stain, on_progress=on_progress)

        def done(res):
            self.last_result = res
            if res.n_patches:
                per = ", ".join(f"{t}: {n} ({res.val_per_tissue.get(t, 0)} val)" for t, n in sorted(res.per_tissue.items()))
                msg = f"Exported {res.n_patches} patches to {res.out_dir} ({per})"
            else:
                msg = f"No new patches written to {res.out_dir}"
            if res.skipped_unknown:
                msg += f"; {res.skipped_unknown} patches with unknown (unreadable) pixels skipped"
            if res.skipped_existing:
                msg += f"; {res.skipped_existing} already in the manifest"
            if res.cleaned_orphans:
                msg += f"; {res.cleaned_orphans} unrecorded files of an interrupted export removed first"
            self.info(msg + ".")
            st.changed.emit("export")

        def failed(e):
            log.exception("export failed", exc_info=e)
            self.error(f"Export failed: {describe_error(e)} (nothing was overwritten; the next export removes what this one wrote and starts again)")

        def fin():
            st.busy = ""
            self._export.enabled = True

        st.busy = "export"
        self._export.enabled = False
        self.set_status("Exporting...")
        self.job = start_job("Exporting corrections", work, on_done=done, on_error=failed, on_finally=fin)
        return self.job

    def write_geojson(self, path: str | None = None):
        from .._writer import write_regions_geojson

        s = self.state.session
        if s is None or not s.regions:
            self.error("Nothing to write: segment a region first.")
            return None
        names = [n for n, r in s.regions.items() if r.reviewed or not self._geo_reviewed.value]
        if not names:
            self.error("No reviewed tissue: tick the tissues you reviewed (or untick 'Only reviewed tissues').")
            return None
        from ..corrections import slide_stem

        p = Path(path or self._geo_path.value.strip() or s.folder / f"{slide_stem(s.slide.id)}.geojson")
        try:
            out = write_regions_geojson(p, [s.regions[n] for n in names], s.slide)
        except Exception as e:  # noqa: BLE001
            log.exception("GeoJSON export failed")
            self.error(f"GeoJSON export failed: {describe_error(e)}")
            return None
        self.info(f"Wrote {out} ({', '.join(names)}); open it in QuPath with File > Import objects.")
        return out
