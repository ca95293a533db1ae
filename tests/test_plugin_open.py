"""Open every widget the way a user does: through napari's plugin machinery and menus.

napari decides which argument receives the viewer by reading the constructor's
annotation as written; a widget it cannot inject fails for every user while tests
that build it by hand pass.  These tests go through napari's own code paths only.
"""

from __future__ import annotations

import pytest

pytest.importorskip("napari")
pytestmark = pytest.mark.gui

WIDGETS = {  # command id -> (display name, menu it sits in)
    "napari-omniseg.segment_widget": ("Segment", "napari/layers/segment"),
    "napari-omniseg.review_widget": ("Review and correct", "napari/layers/annotate"),
    "napari-omniseg.export_widget": ("Export training data", "napari/file/io_utilities"),
    "napari-omniseg.finetune_widget": ("Fine-tune", "napari/file/io_utilities"),
    "napari-omniseg.measure_widget": ("Measurements", "napari/layers/measure"),
}


def _bound_to(widget, viewer) -> bool:
    """The widget talks to this viewer: a layer added to the viewer is seen through the widget."""
    import numpy as np

    name = f"probe-{id(widget)}"
    viewer.add_image(np.zeros((16, 16), np.uint8), name=name)
    try:
        return name in [lyr.name for lyr in widget.viewer.layers]
    finally:
        viewer.layers.remove(name)


@pytest.mark.parametrize("cmd", sorted(WIDGETS))
def test_add_plugin_dock_widget_opens_each_widget(make_napari_viewer, cmd):
    viewer = make_napari_viewer()
    display, _ = WIDGETS[cmd]
    dock, widget = viewer.window.add_plugin_dock_widget("napari-omniseg", display)
    assert dock is not None and widget is not None
    assert _bound_to(widget, viewer)
    assert any(display in name for name in viewer.window.dock_widgets)


@pytest.mark.parametrize("cmd", sorted(WIDGETS))
def test_menu_entry_opens_each_widget(make_napari_viewer, cmd):
    from napari._app_model import get_app_model

    viewer = make_napari_viewer()
    app = get_app_model()
    display, menu_id = WIDGETS[cmd]
    entries = [i.command for i in app.menus.get_menu(menu_id) if hasattr(i, "command")]
    entry = next((c for c in entries if c.id == cmd), None)
    assert entry is not None, f"{cmd} is not in {menu_id}"
    # what clicking the menu entry does: run its command through app-model
    result = app.commands.execute_command(entry.id).result()
    widget = result[0] if isinstance(result, tuple) else result
    assert widget is not None
    assert _bound_to(widget, viewer)
    assert any(display in name for name in viewer.window.dock_widgets)
    # clicking again toggles the same widget instead of failing or duplicating it
    app.commands.execute_command(entry.id).result()
    assert sum(display in name for name in viewer.window.dock_widgets) == 1


def test_all_four_widgets_open_together_and_share_state(make_napari_viewer):
    viewer = make_napari_viewer()
    widgets = [viewer.window.add_plugin_dock_widget("napari-omniseg", d)[1] for d, _ in WIDGETS.values()]
    states = {id(w.state) for w in widgets}
    assert len(states) == 1, "widgets of one viewer must share one plugin state"


def test_finetune_defaults_and_plain_words(make_napari_viewer):
    from napari_omniseg._widgets.finetune import _advice, _patches

    viewer = make_napari_viewer()
    ft = viewer.window.add_plugin_dock_widget("napari-omniseg", "Fine-tune")[1]
    seg = viewer.window.add_plugin_dock_widget("napari-omniseg", "Segment")[1]
    assert ft._device.value == seg._device.value == "auto"
    assert _patches(1) == "1 held-out patch" and _patches(4) == "4 held-out patches"
    assert "too few" in _advice(0.5, 0.9, n_val=1)
    assert "better" in _advice(0.5, 0.9, n_val=10)


def test_drawn_rectangle_layer_shares_the_image_units(make_napari_viewer, recwarn):
    import numpy as np

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((64, 64, 3), np.uint8), rgb=True, name="slide", scale=(0.5, 0.5),
                     units=("micrometer", "micrometer"))
    seg = viewer.window.add_plugin_dock_widget("napari-omniseg", "Segment")[1]
    seg.draw_rectangle()
    shapes = viewer.layers["omniseg region"]
    assert [str(u) for u in shapes.units] == ["micrometer", "micrometer"]
    assert not [w for w in recwarn if "Inconsistent units" in str(w.message)]
