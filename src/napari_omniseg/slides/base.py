"""The ``SlideSource`` interface every slide reader implements, and resampling.

A slide is a pyramid of RGB images: level 0 is the full resolution, each further
level is a downsampled copy.  Readers expose the pyramid through one small
interface so the rest of the product never cares whether the pixels come from an
SVS, an OME-TIFF, an OME-Zarr store, a PNG or OpenSlide:

- ``levels``, ``shapes`` ((H, W) per level), ``downsamples`` (level 0 = 1.0),
  ``mpp`` (microns per pixel at level 0), ``dtype`` (always ``uint8``);
- ``read_region(level, y, x, h, w)``: an ``(h, w, 3) uint8`` array; parts of the
  region outside the level are zero (black); a region entirely outside raises;
- ``dask_level(level)``: a lazy ``(H, W, 3) uint8`` dask array in square chunks;
- ``read_at_mpp(target_mpp, y0, x0, h, w)``: pixels resampled to any pixel size
  (see its docstring for how the level is chosen and when a
  :class:`CoarseSlideWarning` is emitted).

Microns per pixel are never guessed.  A file without a pixel size can only be used
when the user gives one (``open_slide(path, mpp=...)``, ``--mpp`` on the command
line); otherwise :class:`MissingMppError` says so.  A user-given ``mpp`` always
overrides the file's value; the file's own value stays available as ``file_mpp``.

Coordinates are (y, x) = (row, column) throughout, like numpy; shapes are (H, W).
"""

from __future__ import annotations

import abc
import math
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np

#: relative slack when comparing a level's pixel size with a target pixel size
MPP_TOLERANCE = 1.001


class SlideError(ValueError):
    """A slide cannot be opened or read; the message names the file and the problem."""


class MissingMppError(SlideError):
    """The slide has no pixel size (microns per pixel) and none was given."""


class RegionOutsideError(SlideError):
    """A requested region lies entirely outside the slide."""


class CorruptTileError(SlideError):
    """Pixels of a slide could not be decoded (a corrupt or truncated tile).

    Raised for that read only: other regions of the slide stay readable, so a
    whole-slide run can report the tile and go on.
    """


class CoarseSlideWarning(UserWarning):
    """The slide's finest level is coarser than a requested pixel size.

    The pixels are upsampled from level 0, so the tissue is analysed at a lower
    resolution than the model was trained at (for example a 20x scan and a tissue
    the model sees at 40x).
    """


def missing_mpp_error(path: "str | Path", why: str = "") -> MissingMppError:
    """The standard error for a slide without microns per pixel."""
    why = f" ({why})" if why else ""
    return MissingMppError(
        f"{path}: the file does not record its pixel size (microns per pixel){why}. "
        "Pass it explicitly, e.g. `--mpp 0.25` on the command line or "
        "open_slide(path, mpp=0.25) in Python (0.25 um/px is a typical 40x scan, "
        "0.5 um/px a 20x scan); the pixel size is never guessed."
    )


def check_mpp(mpp: Any, path: "str | Path" = "") -> float:
    """Validate a user- or file-given pixel size: a finite number > 0."""
    try:
        v = float(mpp)
    except (TypeError, ValueError):
        raise SlideError(f"{path}: microns per pixel must be a number, got {mpp!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise SlideError(f"{path}: microns per pixel must be a positive number, got {mpp!r}")
    return v


def unit_to_um(value: float, unit: "str | None") -> "float | None":
    """Convert a physical length to microns; ``None`` when the unit is unknown."""
    if unit is None:
        return None
    u = str(unit).strip().lower().replace("µ", "u").replace("μ", "u")
    factors = {
        "um": 1.0, "micrometer": 1.0, "micrometre": 1.0, "micron": 1.0, "microns": 1.0,
        "nm": 1e-3, "nanometer": 1e-3, "nanometre": 1e-3,
        "mm": 1e3, "millimeter": 1e3, "millimetre": 1e3,
        "cm": 1e4, "centimeter": 1e4, "centimetre": 1e4,
        "m": 1e6, "meter": 1e6, "metre": 1e6,
        "a": 1e-4, "angstrom": 1e-4, "ångström": 1e-4,
    }
    f = factors.get(u)
    return None if f is None else float(value) * f


def level_downsample(shape0: tuple[int, int], shape: tuple[int, int]) -> float:
    """Downsample factor of a level from its shape.

    Exact integers are recognised when the level's size is ``floor`` or ``ceil`` of
    level 0 divided by that integer (the usual pyramid rule); otherwise the mean of
    the two axis ratios is used (as OpenSlide does).
    """
    (H0, W0), (H, W) = shape0, shape
    ry, rx = H0 / max(H, 1), W0 / max(W, 1)
    k = round((ry + rx) / 2)
    if k >= 1 and H in (H0 // k, -(-H0 // k)) and W in (W0 // k, -(-W0 // k)):
        return float(k)
    return (ry + rx) / 2


# ------------------------------------------------------------------------ resampling
def block_mean(img: np.ndarray, k: int) -> np.ndarray:
    """Mean over ``k x k`` blocks, rounded half up; exact for integer factors.

    ``img`` is ``(H, W)`` or ``(H, W, C)`` uint8.  The output has ``ceil(H / k) x
    ceil(W / k)`` pixels; blocks cut by the right or bottom edge average only the
    pixels they hold.  ``k == 1`` returns the input unchanged.
    """
    k = int(k)
    if k < 1:
        raise ValueError(f"block size must be >= 1, got {k}")
    if k == 1:
        return img
    a = img if img.ndim == 3 else img[..., None]
    H, W, C = a.shape
    if H % k == 0 and W % k == 0:
        s = a.reshape(H // k, k, W // k, k, C).sum(axis=(1, 3), dtype=np.uint32)
        n = np.uint32(k * k)
        out = (s + n // 2) // n
    else:
        ys, xs = np.arange(0, H, k), np.arange(0, W, k)
        s = np.add.reduceat(np.add.reduceat(a.astype(np.uint32), ys, axis=0), xs, axis=1)
        n = ((np.minimum(ys + k, H) - ys)[:, None] * (np.minimum(xs + k, W) - xs)[None, :])[..., None]
        out = (s + n // 2) // n
    out = out.astype(img.dtype)
    return out if img.ndim == 3 else out[..., 0]


def _block_mean_float(img: np.ndarray, k: int) -> np.ndarray:
    """Unrounded float32 block mean of (H, W, C) uint8.

    A partial block at the bottom or right is completed by repeating the edge pixels
    (callers make crops a multiple of ``k``, so this only happens in margins).
    """
    H, W, C = img.shape
    ph, pw = -H % k, -W % k
    if ph or pw:
        img = np.pad(img, ((0, ph), (0, pw), (0, 0)), mode="edge")
        H, W = H + ph, W + pw
    s = img.reshape(H // k, k, W // k, k, C).sum(axis=(1, 3), dtype=np.uint32)
    return s.astype(np.float32) * np.float32(1.0 / (k * k))


def resample(crop: np.ndarray, off_y: float, off_x: float, f: float, h: int, w: int) -> np.ndarray:
    """Resample ``crop`` (H, W, C uint8) onto an ``h x w`` grid of pixels ``f`` times larger.

    Output pixel ``(r, c)`` covers crop rows ``[off_y + r f, off_y + (r + 1) f)`` and
    columns ``[off_x + c f, off_x + (c + 1) f)`` (pixel edges; ``crop`` pixel ``i``
    covers ``[i, i + 1)``), so sub-pixel offsets are honoured exactly.  Downsampling
    (``f > 1``) is anti-aliased the way ``skimage.transform.resize(anti_aliasing=True)``
    does it (a Gaussian with sigma ``(f - 1) / 2``), after an exact block mean by
    ``floor(f)`` when ``f >= 2`` so that large factors stay fast; sampling is
    bilinear.  Upsampling (``f < 1``) is bilinear.  The crop must extend a few pixels
    past the covered area (``resample_margin``) for the filter.
    """
    from scipy import ndimage

    img = crop.astype(np.float32)
    if f >= 2:
        k = int(math.floor(f))
        img = _block_mean_float(crop, k)
        off_y, off_x, f = off_y / k, off_x / k, f / k
    if f > 1:
        s = (f - 1) / 2
        img = ndimage.gaussian_filter(img, sigma=(s, s, 0), mode="nearest", truncate=4.0)
    c = off_y + 0.5 * f - 0.5, off_x + 0.5 * f - 0.5
    out = ndimage.affine_transform(
        img, (f, f, 1.0), offset=(c[0], c[1], 0.0), output_shape=(h, w, img.shape[2]), order=1, mode="nearest"
    )
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def resample_margin(f: float) -> int:
    """Crop margin (in input pixels) that :func:`resample` needs on each side."""
    if f >= 2:
        k = int(math.floor(f))
        s = max(0.0, (f / k - 1) / 2)
        return k * (int(math.ceil(4 * s)) + 2)
    s = max(0.0, (f - 1) / 2)
    return int(math.ceil(4 * s)) + 2


def _near_int(v: float, tol: float = 1e-6) -> bool:
    return abs(v - round(v)) <= tol


# ------------------------------------------------------------------------ the interface
class _LevelArray:
    """Array-like view of one level for ``dask.array.from_array`` (reads on demand)."""

    def __init__(self, source: "SlideSource", level: int):
        self.source, self.level = source, level
        H, W = source.shapes[level]
        self.shape = (H, W, 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3

    def __getitem__(self, key) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (3 - len(key))
        ys, xs, cs = key
        H, W = self.shape[:2]
        y0, y1, _ = ys.indices(H)
        x0, x1, _ = xs.indices(W)
        if y1 <= y0 or x1 <= x0:
            return np.zeros((max(y1 - y0, 0), max(x1 - x0, 0), 3), np.uint8)[:, :, cs]
        return self.source._read_checked(self.level, y0, y1, x0, x1)[:, :, cs]


class SlideSource(abc.ABC):
    """A pyramidal RGB slide.  Subclasses implement :meth:`_read` and set the metadata.

    Attributes set by subclasses in ``__init__`` (then :meth:`_finish_init`):

    - ``path``: the file or store;
    - ``shapes``: ``[(H, W), ...]`` per level, finest first;
    - ``downsamples``: level-0 pixels per level pixel, ``[1.0, ...]``;
    - ``file_mpp``: microns per pixel recorded in the file, or ``None``;
    - ``format``: a short name (``"svs"``, ``"ome-tiff"``, ``"ome-zarr 0.5"`` ...);
    - ``metadata``: a dict of extra facts (``AppMag``, vendor, ...).

    Sources are safe to read from several threads (dask, the engine's prefetch
    thread) and are context managers that close their files on exit.
    """

    path: Path
    shapes: list[tuple[int, int]]
    downsamples: list[float]
    file_mpp: float | None = None
    format: str = "slide"
    metadata: dict

    def _finish_init(self, mpp: "float | None", require_mpp: bool = True) -> None:
        """Apply the user's ``mpp`` (overrides the file) and validate; call last in __init__."""
        if mpp is not None:
            self._mpp: float | None = check_mpp(mpp, self.path)
            self.mpp_source = "user"
        elif self.file_mpp is not None:
            self._mpp = check_mpp(self.file_mpp, self.path)
            self.mpp_source = "file"
        else:
            self._mpp = None
            self.mpp_source = None
            if require_mpp:
                self.close()
                raise self._missing_mpp()
        self._warned: set = set()
        self._warn_lock = threading.Lock()
        self._closed = False
        if not hasattr(self, "metadata"):
            self.metadata = {}

    def _missing_mpp(self) -> MissingMppError:
        return missing_mpp_error(self.path, getattr(self, "_mpp_why", ""))

    # ------------------------------------------------------------------ metadata
    @property
    def levels(self) -> int:
        """Number of pyramid levels."""
        return len(self.shapes)

    @property
    def mpp(self) -> float:
        """Microns per pixel at level 0 (the user's value if given, else the file's)."""
        if self._mpp is None:
            raise self._missing_mpp()
        return self._mpp

    @property
    def dtype(self) -> np.dtype:
        """Pixel type of what the reads return: always ``uint8`` (RGB)."""
        return np.dtype(np.uint8)

    @property
    def shape(self) -> tuple[int, int]:
        """Level-0 (H, W)."""
        return self.shapes[0]

    def level_mpp(self, level: int) -> float:
        """Microns per pixel of ``level``."""
        return self.mpp * self.downsamples[level]

    def level_for_mpp(self, target_mpp: float) -> int:
        """The coarsest level whose pixels are at most ``target_mpp`` (within 0.1 %).

        Level 0 when even level 0 is coarser than the target.
        """
        best = 0
        for lv in range(self.levels):
            if self.level_mpp(lv) <= target_mpp * MPP_TOLERANCE and self.downsamples[lv] >= self.downsamples[best]:
                best = lv
        return best

    def __repr__(self) -> str:
        mpp = f"{self._mpp:g} um/px ({self.mpp_source})" if getattr(self, "_mpp", None) else "no um/px"
        return f"<{type(self).__name__} {self.format} {str(self.path)!r} {self.shapes[0][0]}x{self.shapes[0][1]}, {self.levels} level(s), {mpp}>"

    # ------------------------------------------------------------------ reading
    @abc.abstractmethod
    def _read(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels ``[y0:y1, x0:x1]`` of ``level`` (inside the level) as (h, w, 3) uint8."""

    def _read_checked(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        if getattr(self, "_closed", False):
            raise SlideError(f"{self.path}: the slide is closed")
        try:
            a = np.asarray(self._read(level, y0, y1, x0, x1))
        except (SlideError, MemoryError):
            raise
        except Exception as e:  # decoder errors (zlib, JPEG ...), truncated files, I/O errors
            raise CorruptTileError(
                f"{self.path}: cannot read level {level} rows {y0}:{y1}, columns {x0}:{x1} "
                f"({type(e).__name__}: {e})"
            ) from e
        if a.shape != (y1 - y0, x1 - x0, 3) or a.dtype != np.uint8:
            raise SlideError(
                f"{self.path}: reader returned {a.shape} {a.dtype} for level {level} "
                f"[{y0}:{y1}, {x0}:{x1}], expected {(y1 - y0, x1 - x0, 3)} uint8"
            )
        return a

    def _check_level(self, level: int) -> int:
        if not isinstance(level, (int, np.integer)) or not 0 <= level < self.levels:
            raise SlideError(f"{self.path}: level {level!r} does not exist (the slide has {self.levels} level(s))")
        return int(level)

    def read_region(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """Pixels of ``level`` in rows ``y:y+h``, columns ``x:x+w`` as (h, w, 3) uint8.

        Coordinates are in that level's pixels.  Parts outside the level are zero
        (black); a region with no pixel inside raises :class:`RegionOutsideError`
        (a ``ValueError``) naming the region and the level's shape.
        """
        level = self._check_level(level)
        y, x, h, w = int(y), int(x), int(h), int(w)
        if h <= 0 or w <= 0:
            raise SlideError(f"{self.path}: region size must be positive, got h={h}, w={w}")
        H, W = self.shapes[level]
        y0, y1, x0, x1 = max(y, 0), min(y + h, H), max(x, 0), min(x + w, W)
        if y0 >= y1 or x0 >= x1:
            raise RegionOutsideError(
                f"{self.path}: region y={y}, x={x}, h={h}, w={w} at level {level} lies entirely "
                f"outside the slide (level {level} is {H} x {W} px, H x W)"
            )
        a = self._read_checked(level, y0, y1, x0, x1)
        if (y0, y1, x0, x1) == (y, y + h, x, x + w):
            return a
        out = np.zeros((h, w, 3), np.uint8)
        out[y0 - y : y1 - y, x0 - x : x1 - x] = a
        return out

    def _read_edge_padded(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Like read_region, but pads outside the level by repeating its edge pixels."""
        H, W = self.shapes[level]
        cy0, cy1, cx0, cx1 = min(max(y0, 0), H - 1), max(min(y1, H), 1), min(max(x0, 0), W - 1), max(min(x1, W), 1)
        cy1, cx1 = max(cy1, cy0 + 1), max(cx1, cx0 + 1)
        a = self._read_checked(level, cy0, cy1, cx0, cx1)
        pad = ((max(cy0 - y0, 0), max(y1 - cy1, 0)), (max(cx0 - x0, 0), max(x1 - cx1, 0)), (0, 0))
        if any(p for pair in pad for p in pair):
            a = np.pad(a, pad, mode="edge")
        # past an edge every padded row/column is the same, so trimming keeps it right
        return a[: y1 - y0, : x1 - x0]

    def dask_level(self, level: int, tile: int = 512):
        """Lazy ``(H, W, 3) uint8`` dask array of ``level`` in square ``tile`` chunks.

        Each chunk is read only when computed, so panning a huge slide in napari or
        mapping a function over it touches only the tiles it needs.  The graph holds
        this open source, so compute it with the local (threaded) scheduler; on a
        dask cluster open the slide inside each task instead.
        """
        import dask.array as da
        from dask.base import tokenize

        level = self._check_level(level)
        if tile <= 0:
            raise SlideError(f"{self.path}: tile size must be positive, got {tile}")
        view = _LevelArray(self, level)
        name = "slide-" + tokenize(str(self.path), level, tile, id(self), self.shapes[level])
        return da.from_array(view, chunks=(tile, tile, 3), name=name, asarray=False, fancy=False, lock=False,
                             meta=np.empty((0, 0, 0), np.uint8))

    def read_at_mpp(self, target_mpp: float, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """An ``(h, w, 3) uint8`` image at ``target_mpp`` microns per pixel.

        ``(y0, x0)`` is the top-left corner in **level-0 pixels**; ``h`` and ``w`` are
        the output size in **target pixels**, so the region covers
        ``h * target_mpp / mpp`` level-0 rows.

        How the pixels are made:

        1. The level is the coarsest one whose pixel size is at most the target
           (``level_mpp <= target_mpp * 1.001``), i.e. the nearest level at or finer
           than the target, so no detail the target could show is lost.
        2. From that level the image is downsampled with anti-aliasing.  When the
           remaining factor is an integer (and the region starts on that level's
           pixel grid) the result is an exact block mean, which is both exact and
           fast; a factor of 1 is a plain read.  Other factors use a Gaussian
           pre-filter (sigma ``(f - 1) / 2``, as ``skimage.transform.resize`` with
           ``anti_aliasing=True``) and bilinear sampling at exact sub-pixel positions.
        3. If even level 0 is coarser than the target (a 20x scan, 0.5 um/px, and a
           tissue the model reads at 40x, 0.25 um/px), the pixels are upsampled
           (bilinear) from level 0 and a :class:`CoarseSlideWarning` is emitted once
           per source and target: the tissue is then analysed at a lower resolution
           than the model was trained at, and results may be worse.

        Output pixels whose centre lies outside the slide are 0 (black); pixels just
        inside the edge are not darkened.  A region with no pixel inside the slide
        raises :class:`RegionOutsideError`.
        """
        target_mpp = check_mpp(target_mpp, self.path)
        y0, x0, h, w = int(y0), int(x0), int(h), int(w)
        if h <= 0 or w <= 0:
            raise SlideError(f"{self.path}: output size must be positive, got h={h}, w={w}")
        mpp = self.mpp
        f0 = target_mpp / mpp  # level-0 pixels per output pixel
        H0, W0 = self.shapes[0]
        if y0 >= H0 or x0 >= W0 or y0 + h * f0 <= 0 or x0 + w * f0 <= 0:
            raise RegionOutsideError(
                f"{self.path}: region at level-0 y={y0}, x={x0} of {h} x {w} px at {target_mpp:g} um/px "
                f"(level-0 extent {h * f0:.0f} x {w * f0:.0f} px) lies entirely outside the slide "
                f"(level 0 is {H0} x {W0} px, H x W)"
            )
        level = self.level_for_mpp(target_mpp)
        if self.level_mpp(level) > target_mpp * MPP_TOLERANCE:
            self._warn_coarse(target_mpp)
        d = self.downsamples[level]
        f = f0 / d  # level pixels per output pixel
        ly, lx = y0 / d, x0 / d
        k = round(f)
        if k >= 1 and abs(f - k) * max(h, w) < 0.5 and _near_int(ly) and _near_int(lx):
            ly, lx = int(round(ly)), int(round(lx))
            crop = self._read_edge_padded(level, ly, ly + h * k, lx, lx + w * k)
            out = block_mean(crop, k) if k > 1 else crop
        else:
            m = resample_margin(f)
            iy, ix = int(math.floor(ly)) - m, int(math.floor(lx)) - m
            iy1, ix1 = int(math.ceil(ly + h * f)) + m, int(math.ceil(lx + w * f)) + m
            if f >= 2:  # whole blocks for the block-mean stage
                k2 = int(math.floor(f))
                iy1, ix1 = iy1 + (-(iy1 - iy) % k2), ix1 + (-(ix1 - ix) % k2)
            crop = self._read_edge_padded(level, iy, iy1, ix, ix1)
            out = resample(crop, ly - iy, lx - ix, f, h, w)
        # black outside the slide (pixel centres past the edge)
        cy = y0 + (np.arange(h) + 0.5) * f0
        cx = x0 + (np.arange(w) + 0.5) * f0
        oy, ox = (cy < 0) | (cy >= H0), (cx < 0) | (cx >= W0)
        if oy.any() or ox.any():
            out = out.copy() if not out.flags.writeable else out
            out[oy] = 0
            out[:, ox] = 0
        return np.ascontiguousarray(out)

    def _warn_coarse(self, target_mpp: float) -> None:
        key = round(target_mpp, 6)
        with self._warn_lock:
            if key in self._warned:
                return
            self._warned.add(key)
        warnings.warn(
            f"{self.path}: the slide's finest level has {self.mpp:.3g} um/px, coarser than the "
            f"{target_mpp:.3g} um/px requested; the pixels are upsampled, so this tissue is analysed "
            f"at a lower resolution than the model was trained at and results may be less accurate",
            CoarseSlideWarning,
            stacklevel=3,
        )

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Release file handles; reads afterwards raise :class:`SlideError`."""
        self._closed = True

    def __enter__(self) -> "SlideSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - best effort
        try:
            if not getattr(self, "_closed", True):
                self.close()
        except Exception:
            pass
