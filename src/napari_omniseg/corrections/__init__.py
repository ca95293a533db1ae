"""Review and correction of segmentations, export as training data, fine-tuning.

Qt-free: the napari widgets in ``napari_omniseg._widgets`` and tests drive the same
functions.  Importing this package does not import torch; :mod:`.finetune` does so
only when a fine-tune runs.
"""

from .export import ExportResult, export_corrections, patch_grid
from .session import (
    CommitRecord,
    CorrectionSession,
    SessionError,
    SlideInfo,
    UncommittedEditsError,
    WorkingRegion,
    default_project_dir,
    slide_stem,
    write_region_to_store,
)

__all__ = [
    "CommitRecord",
    "CorrectionSession",
    "ExportResult",
    "SessionError",
    "SlideInfo",
    "UncommittedEditsError",
    "WorkingRegion",
    "default_project_dir",
    "export_corrections",
    "patch_grid",
    "slide_stem",
    "write_region_to_store",
]
