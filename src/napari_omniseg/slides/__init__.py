"""Slides: one interface over SVS, OME-TIFF, TIFF, OME-Zarr, PNG/JPEG and OpenSlide.

>>> from napari_omniseg.slides import open_slide
>>> with open_slide("slide.svs") as src:            # doctest: +SKIP
...     src.shapes, src.mpp                          # [(H, W), ...], um/px at level 0
...     tile = src.read_at_mpp(1.0, y0, x0, 512, 512)  # 512 x 512 px at 10x

See :mod:`.base` for the interface and the resampling rules, :mod:`.tiff`,
:mod:`.omezarr`, :mod:`.image` and :mod:`.openslide_reader` for the formats,
:mod:`.tissue_mask` for background detection and :mod:`.writers` for writing
test pyramids.  Nothing here imports Qt, napari or torch.
"""

from ._open import open_slide
from .base import (
    CoarseSlideWarning,
    CorruptTileError,
    MissingMppError,
    RegionOutsideError,
    SlideError,
    SlideSource,
    block_mean,
)
from .image import ImageSlide
from .omezarr import OmeZarrSlide
from .openslide_reader import OpenSlideSlide, openslide_available
from .tiff import TiffSlide
from .tissue_mask import tile_has_tissue, tissue_mask, tissue_mask_from_rgb
from .writers import build_pyramid, write_ome_tiff_pyramid, write_ome_zarr_pyramid

__all__ = [
    "open_slide",
    "SlideSource",
    "SlideError",
    "MissingMppError",
    "RegionOutsideError",
    "CoarseSlideWarning",
    "CorruptTileError",
    "TiffSlide",
    "OmeZarrSlide",
    "ImageSlide",
    "OpenSlideSlide",
    "openslide_available",
    "block_mean",
    "tissue_mask",
    "tissue_mask_from_rgb",
    "tile_has_tissue",
    "build_pyramid",
    "write_ome_tiff_pyramid",
    "write_ome_zarr_pyramid",
]
