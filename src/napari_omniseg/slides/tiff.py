"""TIFF-family slides through tifffile: Aperio SVS, pyramidal OME-TIFF, generic TIFF.

Pixels are read lazily: every pyramid level is opened as a zarr array over
tifffile's ``ZarrTiffStore`` (``series.aszarr(level=i)``), so a read decodes only the
tiles (or strips) it touches, and dask chunks map onto those reads.

Which image is the slide:

- **Aperio SVS**: the ``Baseline`` series and its levels; the thumbnail, label and
  macro images are ignored.  ``mpp`` comes from ``MPP = ...`` in the
  ImageDescription, the objective power from ``AppMag = ...`` (``metadata``).
- **OME-TIFF**: the largest image; levels from its SubIFDs (or reduced pages).
  ``mpp`` from OME-XML ``PhysicalSizeX`` and ``PhysicalSizeXUnit`` (um by default;
  nm, mm and other lengths are converted).
- **Generic TIFF**: the largest series with the reduced-resolution pages or SubIFDs
  tifffile groups as its levels (one level for a plain TIFF).  ``mpp`` is
  ``10000 / XResolution`` when ``ResolutionUnit`` is centimeter; inch or no unit is
  treated as missing (72 dpi placeholders are common), so ``--mpp`` is needed.

Only 8-bit RGB is accepted (RGBA drops alpha; planar RGB is fine); grayscale,
2-channel, 16-bit and float images are refused with an explanation.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from .base import SlideError, SlideSource, level_downsample, unit_to_um

#: photometric interpretations that are not RGB even with 3-4 samples
_NOT_RGB = {"SEPARATED", "CIELAB", "ICCLAB", "ITULAB", "PALETTE", "CFA", "LOGL", "LOGLUV", "MASK"}


def _svs_value(description: str, key: str) -> "str | None":
    m = re.search(rf"(?:^|\|)\s*{re.escape(key)}\s*=\s*([^|\r\n]+)", description)
    return m.group(1).strip() if m else None


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _ome_pixels(xml: str) -> list[dict]:
    """Attributes of the ``Pixels`` element of every ``Image`` in an OME-XML document."""
    root = ET.fromstring(xml)
    out = []
    for img in root.iter():
        if _local(img.tag) != "Image":
            continue
        px = next((e for e in img if _local(e.tag) == "Pixels"), None)
        d = dict(px.attrib) if px is not None else {}
        d["_name"] = img.attrib.get("Name")
        out.append(d)
    return out


class TiffSlide(SlideSource):
    """A slide in a TIFF file (SVS, OME-TIFF, generic tiled or striped TIFF).

    ``mpp`` given here overrides the file's value (``file_mpp`` keeps the file's).
    """

    def __init__(self, path: "str | Path", mpp: float | None = None, require_mpp: bool = True):
        import tifffile

        self.path = Path(path)
        self.metadata = {}
        self._stores: list = []
        self._arrays: list = []
        try:
            self._tif = tifffile.TiffFile(self.path)
        except Exception as e:  # tifffile raises TiffFileError, ValueError, struct errors ...
            raise SlideError(f"{self.path}: not a readable TIFF file ({type(e).__name__}: {e})") from e
        try:
            self._check_complete()
            self._setup()
        except BaseException:
            self._close_files()
            raise
        self._finish_init(mpp, require_mpp)

    def _check_complete(self) -> None:
        """Refuse a file that ends before the image data its directories point to (a
        truncated copy or download), naming it so, before any tile is read."""
        import os

        size = os.path.getsize(self.path)
        end = 0
        for page in self._tif.pages:
            offs = getattr(page, "dataoffsets", ()) or ()
            counts = getattr(page, "databytecounts", ()) or ()
            for o, c in zip(offs, counts):
                if c:
                    end = max(end, int(o) + int(c))
        if end > size:
            raise SlideError(f"{self.path}: truncated or corrupt: the file ends at {size:,} bytes but its image data "
                             f"extends to {end:,} bytes; copy or download it again")

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        import zarr

        tif = self._tif
        series = [s for s in tif.series if len(s.shape) >= 2]
        if not series:
            raise SlideError(f"{self.path}: the TIFF holds no image")
        if tif.is_svs:
            self.format = "svs"
            base = [s for s in series if (s.name or "").lower() == "baseline"]
            idx = series.index(base[0]) if base else 0
        else:
            self.format = "ome-tiff" if tif.is_ome else "tiff"
            areas = [self._area(s) for s in series]
            idx = int(np.argmax(areas))
        s = series[idx]
        self._series = s
        self._check_pixels(s)
        self._axes = s.axes
        iy, ix = s.axes.index("Y"), s.axes.index("X")
        self.shapes = [(int(lv.shape[iy]), int(lv.shape[ix])) for lv in s.levels]
        self.downsamples = [1.0] + [level_downsample(self.shapes[0], sh) for sh in self.shapes[1:]]
        for i in range(len(s.levels)):
            store = s.aszarr(level=i)
            self._stores.append(store)
            self._arrays.append(zarr.open(store, mode="r"))
        self.file_mpp = self._find_mpp(tif.series.index(s) if s in tif.series else 0)
        self.metadata["series"] = s.name or str(idx)
        self.metadata["tile"] = (s.keyframe.tilelength, s.keyframe.tilewidth) if s.keyframe.is_tiled else None
        self.metadata["compression"] = getattr(s.keyframe.compression, "name", str(s.keyframe.compression))

    @staticmethod
    def _area(s) -> int:
        try:
            return int(s.shape[s.axes.index("Y")]) * int(s.shape[s.axes.index("X")])
        except ValueError:
            return 0

    def _check_pixels(self, s) -> None:
        """Accept only one 2-D 8-bit RGB(A) image; work out which axis holds the channels."""
        axes, shape = s.axes, tuple(int(n) for n in s.shape)
        if "Y" not in axes or "X" not in axes:
            raise SlideError(f"{self.path}: cannot find the image's Y and X axes (axes {axes}, shape {shape})")
        extra = [(a, n) for a, n in zip(axes, shape) if a not in "YX" and n > 1]
        chan = [(a, n) for a, n in extra if a in "SC"]
        other = [(a, n) for a, n in extra if a not in "SC"]
        photometric = getattr(s.keyframe.photometric, "name", str(s.keyframe.photometric))
        dtype = np.dtype(s.dtype)
        what = f"{dtype} image with axes {axes} and shape {shape} (photometric {photometric})"
        if dtype != np.uint8:
            raise SlideError(
                f"{self.path}: expected 8-bit RGB, got {dtype} ({what}); convert the slide to 8-bit RGB "
                "(brightfield scans are 8-bit; fluorescence or 16-bit images are not supported)"
            )
        if other:
            raise SlideError(
                f"{self.path}: expected a single 2-D RGB image, got extra dimensions "
                f"{', '.join(f'{a}={n}' for a, n in other)} ({what})"
            )
        if len(chan) > 1:
            raise SlideError(f"{self.path}: expected 8-bit RGB, got several channel axes ({what})")
        n = chan[0][1] if chan else 1
        if n not in (3, 4) or photometric in _NOT_RGB:
            kind = "1 channel (grayscale)" if n == 1 else f"{n} channels"
            if n in (3, 4):
                kind = f"{n} channels in {photometric} colour space"
            raise SlideError(f"{self.path}: expected 8-bit RGB, got {kind} ({what})")
        self._chan_axis = chan[0][0]
        self.metadata["alpha_dropped"] = n == 4

    def _find_mpp(self, series_index: int) -> "float | None":
        tif = self._tif
        page = self._series.keyframe
        if tif.is_svs:
            desc = tif.pages[0].description or ""
            mag = _svs_value(desc, "AppMag")
            if mag:
                try:
                    self.metadata["AppMag"] = float(mag)
                except ValueError:
                    pass
            v = _svs_value(desc, "MPP")
            if v is None:
                self._mpp_why = "the Aperio ImageDescription has no 'MPP = ...' entry"
                return None
            try:
                return float(v)
            except ValueError:
                self._mpp_why = f"the Aperio 'MPP' entry {v!r} is not a number"
                return None
        if tif.is_ome and tif.ome_metadata:
            try:
                pix = _ome_pixels(tif.ome_metadata)
            except ET.ParseError as e:
                self._mpp_why = f"the OME-XML cannot be parsed: {e}"
                return None
            name = self._series.name
            match = [p for p in pix if name and p.get("_name") == name]
            p = match[0] if match else (pix[series_index] if series_index < len(pix) else (pix[0] if pix else {}))
            if "PhysicalSizeX" not in p:
                self._mpp_why = "the OME-XML has no PhysicalSizeX"
                return None
            unit = p.get("PhysicalSizeXUnit", "µm")
            v = unit_to_um(float(p["PhysicalSizeX"]), unit)
            if v is None:
                self._mpp_why = f"the OME-XML PhysicalSizeXUnit {unit!r} is not a length unit"
            return v
        tags = page.tags
        xres, unit = tags.get("XResolution"), tags.get("ResolutionUnit")
        unit_v = int(unit.value) if unit is not None else 2  # TIFF default: inch
        if xres is None:
            self._mpp_why = "the TIFF has no XResolution tag"
            return None
        num, den = xres.value if isinstance(xres.value, tuple) else (xres.value, 1)
        res = float(num) / float(den) if den else 0.0
        if unit_v == 3 and res > 0:  # centimeter
            return 1e4 / res
        unit_name = {1: "none", 2: "inch", 3: "centimeter"}.get(unit_v, str(unit_v))
        hint = f"; if the resolution is real, 25400 / {res:g} = {25400 / res:.4g} um/px" if unit_v == 2 and res > 1 else ""
        self._mpp_why = f"the TIFF resolution unit is {unit_name}, which is not trusted{hint}"
        return None

    # ------------------------------------------------------------------ reading
    def _read(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        idx, keep = [], []
        for a in self._axes:
            if a == "Y":
                idx.append(slice(y0, y1))
                keep.append(a)
            elif a == "X":
                idx.append(slice(x0, x1))
                keep.append(a)
            elif a == self._chan_axis:
                idx.append(slice(None))
                keep.append(a)
            else:
                idx.append(0)
        a = np.asarray(self._arrays[level][tuple(idx)])
        a = np.transpose(a, [keep.index("Y"), keep.index("X"), keep.index(self._chan_axis)])
        return np.ascontiguousarray(a[:, :, :3])

    # ------------------------------------------------------------------ lifetime
    def _close_files(self) -> None:
        for st in self._stores:
            try:
                st.close()
            except Exception:
                pass
        self._stores, self._arrays = [], []
        tif = getattr(self, "_tif", None)
        if tif is not None:
            tif.close()

    def close(self) -> None:
        """Close the TIFF file and its zarr stores."""
        self._close_files()
        super().close()
