"""The Measurements widget: per tissue, objects, area and density, in the viewer.

Two scopes: the *region* being reviewed (the working regions, as painted right
now) or the *whole-slide* result (the project's label store).  The numbers come
from :func:`napari_omniseg.labels.export.measure_mask` /
:func:`~napari_omniseg.labels.export.measurements`, the same code as the CLI's
measurements CSV, so the table and the file always agree.  Copy puts the table on
the clipboard as tab-separated text (pastes into a spreadsheet); Save writes CSV.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from magicgui.widgets import ComboBox, Container, Label, LineEdit, PushButton

from ..tissues import get_tissue
from ._base import OmnisegWidget, describe_error, log, short_label

if TYPE_CHECKING:
    import napari

SCOPE_REGION = "Region being reviewed"
SCOPE_SLIDE = "Whole-slide result"
#: table columns: header, row key, format
COLUMNS = (
    ("Tissue", "tissue", None),
    ("Objects", "objects", "{:d}"),
    ("Area (mm²)", "area_um2", "mm2"),
    ("Mean object (µm²)", "mean_object_area_um2", "{:.0f}"),
    ("Objects / mm²", "density_per_mm2", "{:.1f}"),
)


def region_rows(session) -> list[dict]:
    """Measurements of the session's working regions (densities per mm² of each region)."""
    from ..labels.export import measure_mask

    rows = []
    mpp0 = float(session.slide.mpp)
    for name, wr in session.regions.items():
        _x, _y, w, h = wr.region
        area_mm2 = float(w) * float(h) * mpp0**2 / 1e6
        rows.append(measure_mask(name, wr.data, float(wr.mpp), area_mm2, "region"))
    return rows


class MeasureWidget(OmnisegWidget):
    """Count and measure each tissue of the region or of the whole slide."""

    def __init__(self, viewer: napari.viewer.Viewer):  # this exact annotation is how napari finds the viewer argument
        super().__init__(viewer)
        from qtpy.QtWidgets import QAbstractItemView, QTableWidget

        self._scope = ComboBox(label="Measure", choices=[SCOPE_REGION, SCOPE_SLIDE], value=SCOPE_REGION)
        self._run = PushButton(text="Measure")
        self._copy = PushButton(text="Copy table")
        self._csv = LineEdit(label="CSV file", value="")
        self._csv.native.setPlaceholderText("automatic: <project>/measurements-<scope>.csv")
        self._save = PushButton(text="Save CSV")
        self._note = Label(value="")
        self._note.native.setWordWrap(True)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels([c[0] for c in COLUMNS])
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.setMinimumHeight(180)
        self.extend([self._scope, self._run, self._note])
        self.native.layout().addWidget(self.table)
        self.extend([Container(widgets=[self._copy, self._save], layout="horizontal", labels=False), self._csv,
                     self.status])
        self._run.changed.connect(lambda: self.measure())
        self._copy.changed.connect(lambda: self.copy())
        self._save.changed.connect(lambda: self.save_csv())
        self._scope.changed.connect(lambda v: self.measure(quiet=True))
        self.state.changed.connect(lambda what: self.measure(quiet=True) if what in ("regions", "commit") else None)
        self.rows: list[dict] = []
        self.job = None
        self.measure(quiet=True)

    # ------------------------------------------------------------------ measuring
    def measure(self, scope: str | None = None, quiet: bool = False):
        """Fill the table; the region is measured at once, the slide in the background."""
        if scope is not None:
            self._scope.value = scope
        s = self.state.session
        if s is None:
            self._show([], "No project yet: segment a region (or the whole slide) first.")
            if not quiet:
                self.error("Nothing to measure: segment a region first.")
            return None
        if self._scope.value == SCOPE_REGION:
            if not s.regions:
                self._show([], "No region segmented in this project yet.")
                if not quiet:
                    self.error("No region to measure: segment a region, or choose 'Whole-slide result'.")
                return None
            try:
                rows = region_rows(s)
            except Exception as e:  # noqa: BLE001
                log.exception("measuring the region failed")
                self.error(f"Measuring failed: {describe_error(e)}")
                return None
            self._show(rows, "The regions as painted now; density per mm² of each tissue's region.")
            return rows
        if not s.store_path or not Path(s.store_path).exists():
            self._show([], "No whole-slide result in this project: run Segment with scope 'Whole slide'.")
            if not quiet:
                self.error("No whole-slide result to measure: run Segment with scope 'Whole slide' first.")
            return None
        if quiet:  # a scope switch or a commit: measure the slide only when asked
            self._show([], "Press Measure to measure the whole-slide result.")
            return None
        return self._measure_store(s.store_path)

    def _measure_store(self, path):
        from ..labels.export import measurements
        from ._jobs import start_job

        def work(on_progress, should_stop):
            return measurements(path)

        def done(rows):
            basis = {r["density_basis"] for r in rows}
            where = "the tissue area the engine found" if basis == {"store"} else "the whole slide"
            self._show(rows, f"The whole-slide result ({Path(path).name}); density per mm² of {where}.")
            self.set_status(f"Measured {len(rows)} tissue(s).")

        def failed(e):
            self.error(f"Measuring failed: {describe_error(e)}")

        self.set_status("Measuring the whole-slide result...")
        self.job = start_job("Measuring", work, on_done=done, on_error=failed)
        return self.job

    def _show(self, rows: list[dict], note: str) -> None:
        from qtpy.QtWidgets import QTableWidgetItem

        self.rows = list(rows)
        self._note.value = note
        self.table.setRowCount(len(rows))
        for i, r in enumerate(rows):
            for j, (_h, key, fmt) in enumerate(COLUMNS):
                v = r[key]
                if key == "tissue":
                    text = short_label(get_tissue(v))
                elif fmt == "mm2":
                    text = f"{v / 1e6:.4f}"
                else:
                    text = fmt.format(v)
                self.table.setItem(i, j, QTableWidgetItem(text))
        self.table.resizeColumnsToContents()

    # ------------------------------------------------------------------ out
    def as_text(self) -> str:
        """The table as tab-separated text, exact values, with a header line."""
        from ..labels.export import MEASUREMENT_COLUMNS

        lines = ["\t".join(MEASUREMENT_COLUMNS)]
        lines += ["\t".join(str(r[k]) for k in MEASUREMENT_COLUMNS) for r in self.rows]
        return "\n".join(lines) + "\n"

    def copy(self) -> str | None:
        if not self.rows:
            self.error("Nothing to copy: press Measure first.")
            return None
        from qtpy.QtWidgets import QApplication

        text = self.as_text()
        QApplication.clipboard().setText(text)
        self.info(f"Copied {len(self.rows)} row(s); paste them into a spreadsheet.")
        return text

    def csv_path(self) -> Path | None:
        if self._csv.value.strip():
            return Path(self._csv.value.strip()).expanduser()
        s = self.state.session
        if s is None:
            return None
        scope = "region" if self._scope.value == SCOPE_REGION else "slide"
        return Path(s.folder) / f"measurements-{scope}.csv"

    def save_csv(self) -> Path | None:
        from .._io import atomic_write_bytes
        from ..labels.export import measurements_csv

        if not self.rows:
            self.error("Nothing to save: press Measure first.")
            return None
        out = self.csv_path()
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(out, measurements_csv(self.rows).encode("utf-8"))
        except OSError as e:
            self.error(f"Could not write {out}: {describe_error(e)}")
            return None
        self.info(f"Saved {len(self.rows)} row(s) to {out}")
        return out
