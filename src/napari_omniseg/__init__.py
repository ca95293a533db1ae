"""napari-omniseg: multi-tissue kidney segmentation with one dynamic network.

The core (tissues, model, slides, inference, labels, training, corrections) never
imports Qt or napari; the napari plugin lives in ``_widgets`` and the ``_reader`` /
``_writer`` / ``_sample_data`` modules named by ``napari.yaml``.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
