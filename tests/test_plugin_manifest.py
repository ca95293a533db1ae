"""The npe2 manifest: valid, every python_name imports, nothing heavy at import time."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

MANIFEST = Path(__file__).resolve().parents[1] / "src" / "napari_omniseg" / "napari.yaml"


def _manifest():
    from npe2 import PluginManifest

    return PluginManifest.from_file(MANIFEST)


def test_manifest_is_valid_and_named():
    mf = _manifest()
    assert mf.name == "napari-omniseg"
    assert mf.display_name == "Omni-Seg kidney tissues"
    ids = {c.id for c in mf.contributions.commands}
    for group in (mf.contributions.readers, mf.contributions.writers, mf.contributions.sample_data,
                  mf.contributions.widgets):
        for item in group:
            assert item.command in ids
    assert set(mf.contributions.menus) == {"napari/layers/segment", "napari/layers/annotate",
                                           "napari/layers/measure", "napari/file/io_utilities"}


@pytest.mark.parametrize("cmd", [c.python_name for c in _manifest().contributions.commands])
def test_every_python_name_imports(cmd):
    mod, _, attr = cmd.partition(":")
    obj = getattr(importlib.import_module(mod), attr)
    assert callable(obj)


def test_reader_writer_and_sample_modules_do_not_import_torch_or_qt():
    code = ("import sys, napari_omniseg._reader, napari_omniseg._writer, napari_omniseg._sample_data, "
            "napari_omniseg._widgets; bad = [m for m in ('torch', 'qtpy', 'PyQt5') if m in sys.modules]; "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_plugin_is_discovered_by_npe2():
    from npe2 import PluginManager

    pm = PluginManager.instance()
    pm.discover()
    assert "napari-omniseg" in {m.name for m in pm.iter_manifests()}


def test_widget_modules_do_not_import_torch_until_used():
    code = ("import sys, napari_omniseg._widgets.segment, napari_omniseg._widgets.review, "
            "napari_omniseg._widgets.export, napari_omniseg._widgets.finetune; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
