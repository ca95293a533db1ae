"""Shared plumbing of the plugin's dock widgets (magicgui Containers)."""

from __future__ import annotations

import logging

from magicgui.widgets import Container, Label

from ._state import get_state

log = logging.getLogger("napari_omniseg")


def background_threads() -> int:
    """Default torch CPU threads for background jobs: all cores but one, so the viewer
    keeps a core (on a 2-core machine that is 1 thread; measured in benchmarks/viewer_latency.py)."""
    import os

    n = os.cpu_count() or 1
    return max(1, n - 1)


def show_error(msg: str) -> None:
    from napari.utils.notifications import show_error as _se

    log.error(msg)
    _se(msg)


def show_info(msg: str) -> None:
    from napari.utils.notifications import show_info as _si

    log.info(msg)
    _si(msg)


def describe_error(e: BaseException) -> str:
    """A one-line message for the user: the exception's own text, its type when that is empty."""
    text = str(e).strip()
    return text if text else type(e).__name__


def short_label(t) -> str:
    """A tissue's label without the parenthesised detail (fits narrow docks)."""
    return t.short_label


def color_icon(color: str, size: int = 12):
    from qtpy.QtGui import QColor, QIcon, QPixmap

    pm = QPixmap(size, size)
    pm.fill(QColor(color))
    return QIcon(pm)


class OmnisegWidget(Container):
    """A dock widget bound to one viewer and the plugin state of that viewer."""

    def __init__(self, viewer, **kwargs):
        super().__init__(**kwargs)
        self.viewer = viewer
        self.state = get_state(viewer)
        self.status = Label(value="")
        self.status.native.setWordWrap(True)
        self._error_text = ""
        # an error message describes the state it was raised in: once that state changes
        # (a region segmented, a tissue reviewed, a commit, a layer added or selected),
        # it is cleared instead of standing there after the problem is fixed
        self.state.changed.connect(lambda *_: self.clear_error())
        viewer.layers.events.inserted.connect(lambda *_: self.clear_error())
        viewer.layers.selection.events.active.connect(lambda *_: self.clear_error())

    def set_status(self, text: str) -> None:
        self.status.value = text
        self._error_text = ""

    def error(self, msg: str) -> None:
        self.set_status(msg)
        self._error_text = msg
        show_error(msg)

    def clear_error(self) -> None:
        """Remove the status line if it still shows the last error."""
        if self._error_text and self.status.value == self._error_text:
            self.status.value = ""
        self._error_text = ""

    def info(self, msg: str) -> None:
        self.set_status(msg)
        show_info(msg)

    def image_layers(self):
        from napari.layers import Image

        return [lyr for lyr in self.viewer.layers if isinstance(lyr, Image)]

    def layer_choices(self, kind):
        def choices(_w=None):
            return [(lyr.name, lyr) for lyr in self.viewer.layers if isinstance(lyr, kind)]

        return choices

    def watch_layers(self, *widgets) -> None:
        """Refresh the choices of ``widgets`` whenever layers are added, removed or renamed."""

        def refresh(_event=None):
            for w in widgets:
                try:
                    w.reset_choices()
                except Exception:  # noqa: BLE001 - a stale choice must not break the viewer
                    pass

        for ev in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed,
                   self.viewer.layers.events.reordered):
            ev.connect(refresh)
        refresh()
