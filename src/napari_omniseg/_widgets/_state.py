"""State shared by the plugin's widgets of one viewer (no Qt widgets here).

The segment, review, export and fine-tune widgets work on the same slide: the
image layer, its source, the correction session (project folder), the current
region and the checkpoint used.  One :class:`PluginState` per viewer holds them and
emits ``changed`` when any of it changes, so each widget can refresh itself.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

from psygnal import Signal

_STATES: "weakref.WeakKeyDictionary[Any, PluginState]" = weakref.WeakKeyDictionary()


class PluginState:
    changed = Signal(str)  #: what changed: "session", "regions", "model", "export", "reviewed"

    def __init__(self, viewer):
        self._viewer = weakref.ref(viewer)
        self.image_layer = None
        self.source = None
        self.session = None  # CorrectionSession
        self.region: tuple[int, int, int, int] | None = None  #: last level-0 (x, y, w, h)
        self.tissues: list[str] = []  #: tissues of the last run
        self.last_model_version: str = ""
        self.last_checkpoint: Path | None = None
        self.last_report = None
        self.seconds_per_tile: dict = {}  #: magnification -> measured s/tile
        self._segmenters: dict = {}
        self.segment_widget = None  # set by the segment widget, so fine-tune can re-run it
        self.busy: str = ""  #: name of the running job ("" when idle)

    @property
    def viewer(self):
        return self._viewer()

    def segmenter(self, ckpt_path: "str | Path", device: str, engine_cfg):
        """A cached :class:`Segmenter` per (checkpoint file, device, engine settings)."""
        from ..inference.engine import Segmenter
        from ..model.checkpoint import load_checkpoint

        key = (str(Path(ckpt_path).resolve()), device, repr(engine_cfg))
        seg = self._segmenters.get(key)
        if seg is None:
            ck = load_checkpoint(ckpt_path, device="cpu")
            seg = Segmenter(ck, engine_cfg)
            self._segmenters.clear()  # one model in memory at a time
            self._segmenters[key] = seg
        return seg


def get_state(viewer) -> PluginState:
    st = _STATES.get(viewer)
    if st is None:
        st = _STATES[viewer] = PluginState(viewer)
    return st
