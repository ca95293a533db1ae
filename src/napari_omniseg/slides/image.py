"""Plain (non-pyramidal) images held in memory: PNG, JPEG, TIFF, or a numpy array.

PNG and JPEG are decoded with imagecodecs (libpng / libjpeg-turbo; no PIL, which
refuses images over 179 Mpx), TIFF with tifffile.  The whole image is loaded, so
this is meant for fields of view and patches, not whole slides (``open_slide``
sends TIFF files to the lazy :class:`~.tiff.TiffSlide` instead).  These formats do
not carry a trustworthy pixel size, so ``mpp`` must be given; without it
:class:`~.base.MissingMppError` asks for ``--mpp``.  One level.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import SlideError, SlideSource


def as_rgb8(img: np.ndarray, name: "str | Path") -> np.ndarray:
    """Validate an image as 8-bit RGB(A) and return (H, W, 3) uint8 (alpha dropped)."""
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise SlideError(f"{name}: expected 8-bit RGB, got {img.dtype} (shape {img.shape}); convert it to 8-bit RGB")
    if img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 1):
        raise SlideError(f"{name}: expected 8-bit RGB, got 1 channel (grayscale, shape {img.shape})")
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        n = img.shape[2] if img.ndim == 3 else None
        kind = f"{n} channels" if n else f"a {img.ndim}-D array"
        raise SlideError(f"{name}: expected 8-bit RGB, got {kind} (shape {img.shape})")
    return np.ascontiguousarray(img[:, :, :3])


def _load(path: Path) -> tuple[np.ndarray, str]:
    ext = path.suffix.lower()
    try:
        if ext in (".tif", ".tiff"):
            import tifffile

            return tifffile.imread(path, series=0, level=0), "tiff"
        import imagecodecs

        return imagecodecs.imread(str(path)), ext.lstrip(".") or "image"
    except FileNotFoundError:
        raise SlideError(f"{path}: no such file") from None
    except Exception as e:
        raise SlideError(f"{path}: cannot decode the image ({type(e).__name__}: {e})") from e


class ImageSlide(SlideSource):
    """A single-level RGB image in memory, from a file or an ``(H, W, 3|4) uint8`` array.

    ``mpp`` is required (PNG/JPEG carry no reliable pixel size) unless
    ``require_mpp=False``, in which case ``.mpp`` raises when first needed.
    """

    def __init__(self, path_or_array: "str | Path | np.ndarray", mpp: float | None = None,
                 require_mpp: bool = True, name: str | None = None):
        if isinstance(path_or_array, np.ndarray):
            self.path = Path(name or "<array>")
            img, fmt = path_or_array, "array"
        else:
            self.path = Path(path_or_array)
            img, fmt = _load(self.path)
        self._img = as_rgb8(img, self.path)
        self.format = fmt
        self.metadata = {}
        self.shapes = [tuple(int(n) for n in self._img.shape[:2])]
        self.downsamples = [1.0]
        self.file_mpp = None
        self._mpp_why = f"{fmt.upper()} files carry no reliable pixel size" if fmt != "array" else "an array has no pixel size"
        self._finish_init(mpp, require_mpp)

    def _read(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return self._img[y0:y1, x0:x1].copy()

    def close(self) -> None:
        """Release the pixels."""
        super().close()
