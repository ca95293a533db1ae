"""Vendor formats (NDPI, MRXS, SCN, VMS, BIF, ...) through OpenSlide, an optional extra.

Install with ``pip install napari-omniseg[openslide]`` (openslide-python plus the
openslide-bin wheels; no system package needed).  OpenSlide returns premultiplied
RGBA; regions with no scanned data (alpha 0) come out white, like glass, and the
rest is composited over white to RGB.  ``mpp`` comes from ``openslide.mpp-x``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import SlideError, SlideSource

INSTALL_HINT = "pip install napari-omniseg[openslide]"


def openslide_available() -> bool:
    """True when ``openslide`` (with its library) imports."""
    try:
        import openslide  # noqa: F401
    except Exception:  # ImportError, or OSError when the C library is missing
        return False
    return True


class OpenSlideSlide(SlideSource):
    """A slide read through OpenSlide.

    ``mpp`` given here overrides the file's value (``file_mpp`` keeps the file's).
    """

    def __init__(self, path: "str | Path", mpp: float | None = None, require_mpp: bool = True):
        self.path = Path(path)
        self.metadata = {}
        try:
            import openslide
        except Exception as e:
            raise SlideError(
                f"{self.path}: reading {self.path.suffix or 'this'} files needs OpenSlide, which is not installed "
                f"({type(e).__name__}: {e}); install it with `{INSTALL_HINT}`"
            ) from None
        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except Exception as e:
            raise SlideError(f"{self.path}: OpenSlide cannot open this file ({type(e).__name__}: {e})") from e
        osr = self._osr
        self.format = f"openslide:{osr.properties.get('openslide.vendor', 'unknown')}"
        self.shapes = [(int(h), int(w)) for (w, h) in osr.level_dimensions]
        self.downsamples = [1.0] + [float(d) for d in osr.level_downsamples[1:]]
        props = osr.properties
        self.metadata["vendor"] = props.get("openslide.vendor")
        if props.get("openslide.objective-power"):
            try:
                self.metadata["AppMag"] = float(props["openslide.objective-power"])
            except ValueError:
                pass
        v = props.get("openslide.mpp-x")
        self.file_mpp = None
        if v:
            try:
                self.file_mpp = float(v)
            except ValueError:
                self._mpp_why = f"openslide.mpp-x is {v!r}, not a number"
        else:
            self._mpp_why = "OpenSlide reports no openslide.mpp-x"
        self._finish_init(mpp, require_mpp)

    def _read(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        d = self.downsamples[level]
        im = self._osr.read_region((int(round(x0 * d)), int(round(y0 * d))), level, (x1 - x0, y1 - y0))
        rgba = np.asarray(im)
        # premultiplied alpha over white: rgb + (255 - a)
        rgb = rgba[:, :, :3].astype(np.uint16) + (255 - rgba[:, :, 3:4].astype(np.uint16))
        return np.minimum(rgb, 255).astype(np.uint8)

    def close(self) -> None:
        """Close the OpenSlide handle."""
        osr = getattr(self, "_osr", None)
        if osr is not None:
            osr.close()
        super().close()
