"""The training-set manifest: ``manifest.csv`` beside RGB PNG patches and 0/255 masks.

Its columns are a superset of the Omni-Seg ``data_list.csv`` columns, so a folder
written by napari-omniseg also loads in tools that read that format.  Rows are only
ever appended, atomically: the new file is written beside the old one, fsynced and
renamed over it, so a crash leaves either the old or the new manifest, never half.
"""

from __future__ import annotations

import csv
import io
import os
import threading
from pathlib import Path
from typing import Iterable, Mapping

from .._io import atomic_write_bytes, process_lock

#: columns in order; the first five are Omni-Seg's data_list.csv
MANIFEST_COLUMNS = (
    "image_path",
    "label_path",
    "name",
    "task_id",
    "scale_id",
    "tissue",
    "mpp",
    "source_slide",
    "level",
    "x",
    "y",
    "stain",
    "origin",
    "timestamp",
    "model_version",
    "split",
)

_LOCK = threading.Lock()


def read_manifest_rows(path: "str | Path") -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_manifest_rows(path: "str | Path", rows: Iterable[Mapping]) -> int:
    """Append rows to ``path`` (created with a header if missing); returns rows added.

    Unknown keys are refused so a typo cannot silently drop information.
    """
    path = Path(path)
    rows = list(rows)
    for r in rows:
        bad = set(r) - set(MANIFEST_COLUMNS)
        if bad:
            raise ValueError(f"unknown manifest columns: {sorted(bad)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with _LOCK, process_lock(path):  # threads of this process, and other processes
        old = path.read_bytes() if path.exists() else b""
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        if not old:
            w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in MANIFEST_COLUMNS})
        if old and not old.endswith(b"\n"):
            old += b"\n"
        atomic_write_bytes(path, old + buf.getvalue().encode())
    return len(rows)


def relpath(p: "str | Path", start: "str | Path") -> str:
    return os.path.relpath(Path(p), Path(start)).replace(os.sep, "/")
