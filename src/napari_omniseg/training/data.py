"""Partial-label datasets: every image carries one binary mask for one tissue.

Three ways to describe a dataset, all giving a list of :class:`Sample`:

- the Omni-Seg folder layout ``<task>_<scale>_<name>/<stain>/im_X.png`` with the mask
  beside it as ``im_X_mask_<anything>.png``;
- Omni-Seg's ``data_list.csv`` (image_path, label_path, name, task_id, scale_id);
- napari-omniseg's ``manifest.csv`` (see :mod:`.manifest`).

A split file (``splits.csv``: image_path and split columns) assigns train/val/test.

Images in any common encoding (RGB, RGBA, greyscale, palette, 16-bit) become
uint8 RGB; masks (L, LA, RGB, RGBA; 0/255, 0/1 or boolean) become boolean.  Problems
are reported as :class:`DataError` naming the file: unreadable file, image/mask size
mismatch, a mask with more than two values.  Empty masks are kept by default (an
image can truly hold none of its tissue); ``drop_empty=True`` skips them with a
warning.
"""

from __future__ import annotations

import csv
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..tissues import TISSUES, Tissue, get_tissue

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_FOLDER_RE = re.compile(r"^(\d+)_(\d+)_(.+)$")
_STAINS = {"he", "pas", "sil", "tri"}


class DataError(ValueError):
    """A training file is unreadable or inconsistent; the message names the file."""


@dataclass
class Sample:
    image_path: Path
    label_path: Path
    tissue: Tissue
    stain: str = ""
    split: str = ""
    origin: str = "reference"
    meta: dict = field(default_factory=dict)
    image: np.ndarray | None = None  # uint8 H x W x 3, filled by load_arrays
    mask: np.ndarray | None = None  # bool H x W

    @property
    def key(self) -> str:
        return f"{self.tissue.short}/{self.stain}/{self.image_path.name}"


# --------------------------------------------------------------------------- reading
def read_image(path: "str | Path") -> np.ndarray:
    """Read a patch as uint8 RGB (H x W x 3)."""
    a = _imread(path)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3:
        raise DataError(f"{path}: expected a 2-D image, got an array of shape {a.shape}")
    a = _to_uint8(a, path)
    c = a.shape[2]
    if c == 1:
        a = np.repeat(a, 3, axis=2)
    elif c == 2:  # grey + alpha
        a = np.repeat(a[..., :1], 3, axis=2)
    elif c >= 3:
        a = a[..., :3]
    return np.ascontiguousarray(a)


def read_mask(path: "str | Path") -> np.ndarray:
    """Read a binary mask as bool (H x W); more than two values is a :class:`DataError`."""
    a = _imread(path)
    if a.ndim == 3:
        # colour masks: foreground is any non-zero colour channel (alpha ignored)
        a = a[..., :3].max(axis=2) if a.shape[2] >= 3 else a[..., 0]
    if a.ndim != 2:
        raise DataError(f"{path}: expected a 2-D mask, got an array of shape {a.shape}")
    if a.dtype == bool:
        return a
    vals = np.unique(a)
    if vals.size > 2:
        raise DataError(
            f"{path}: mask is not binary ({vals.size} distinct values, e.g. {vals[:5].tolist()}); "
            "expected 0/255 or 0/1 (a lossy JPEG mask or a label image with several ids is not a binary mask)"
        )
    return a > 0 if vals.size == 2 or vals[0] != 0 else np.zeros(a.shape, bool)


def _imread(path: "str | Path") -> np.ndarray:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file does not exist")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            return np.asarray(tifffile.imread(path))
        import imageio.v3 as iio

        return np.asarray(iio.imread(path))
    except DataError:
        raise
    except Exception as e:  # decoder errors come in many types
        raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


def _to_uint8(a: np.ndarray, path) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    if a.dtype == np.uint16:
        return (a >> 8).astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        if np.nanmax(a) <= 1.0 and np.nanmin(a) >= 0.0:
            return np.round(a * 255).astype(np.uint8)
        raise DataError(f"{path}: float image with values outside [0, 1]")
    raise DataError(f"{path}: unsupported pixel type {a.dtype}")


# --------------------------------------------------------------------------- finding
def _mask_for(img: Path) -> Path | None:
    cands = sorted(img.parent.glob(img.stem + "_mask*"))
    return cands[0] if cands else None


def load_folder(root: "str | Path", tissues: Sequence[Tissue] = TISSUES) -> list[Sample]:
    """The Omni-Seg layout: ``root/<task>_<scale>_<name>/<stain>/<image>`` + ``<image>_mask*``."""
    root = Path(root)
    out: list[Sample] = []
    for tdir in sorted(p for p in root.iterdir() if p.is_dir()):
        m = _FOLDER_RE.match(tdir.name)
        if not m:
            continue
        tissue = get_tissue(int(m.group(1)), tissues)
        for img in sorted(tdir.rglob("*")):
            if not img.is_file() or img.suffix.lower() not in IMAGE_EXTS or "mask" in img.name or img.name.startswith("."):
                continue
            mask = _mask_for(img)
            if mask is None:
                raise DataError(f"{img}: no mask found beside it (expected {img.stem}_mask*.png)")
            stain = img.parent.name if img.parent != tdir else ""
            out.append(Sample(img, mask, tissue, stain=stain))
    if not out:
        raise DataError(f"{root}: no <task>_<scale>_<name>/ folders with images found")
    return out


def _guess_stain(p: Path) -> str:
    for part in reversed(p.parts[:-1]):
        if part.lower() in _STAINS:
            return part.lower()
    return ""


def load_csv(path: "str | Path", tissues: Sequence[Tissue] = TISSUES) -> list[Sample]:
    """A data_list.csv or a manifest.csv (paths relative to the CSV's folder)."""
    path = Path(path)
    base = path.parent
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8 CSV") from None
    except csv.Error as e:
        raise DataError(f"{path}: not a readable CSV ({e})") from None
    if not rows:
        raise DataError(f"{path}: no rows")
    need = {"image_path", "label_path"}
    if not need <= set(rows[0]):
        raise DataError(f"{path}: needs columns image_path and label_path (has {list(rows[0])})")
    out = []
    for i, r in enumerate(rows, start=2):
        key = r.get("tissue") or r.get("task_id")
        if key in (None, ""):
            raise DataError(f"{path}, line {i}: no tissue or task_id")
        try:
            tissue = get_tissue(key, tissues)
        except KeyError as e:
            raise DataError(f"{path}, line {i}: {e}") from None
        img = Path(r["image_path"])
        lab = Path(r["label_path"])
        img = img if img.is_absolute() else base / img
        lab = lab if lab.is_absolute() else base / lab
        meta = {k: v for k, v in r.items() if k not in ("image_path", "label_path", "split", "stain", "origin")}
        out.append(
            Sample(
                img,
                lab,
                tissue,
                stain=(r.get("stain") or _guess_stain(img)),
                split=r.get("split", "") or "",
                origin=r.get("origin") or "reference",
                meta=meta,
            )
        )
    return out


def apply_split(samples: list[Sample], split_file: "str | Path") -> list[Sample]:
    """Set each sample's split from a CSV with image_path and split columns."""
    split_file = Path(split_file)
    with open(split_file, newline="") as f:
        rows = list(csv.DictReader(f))
    table = {}
    for r in rows:
        p = Path(r["image_path"])
        table[str((p if p.is_absolute() else split_file.parent / p).resolve())] = r["split"]
    for s in samples:
        key = str(s.image_path.resolve())
        if key in table:
            s.split = table[key]
    return samples


def load_dataset(path: "str | Path", split_file: "str | Path | None" = None, tissues: Sequence[Tissue] = TISSUES) -> list[Sample]:
    """Load any supported description of a dataset.

    ``path`` may be a CSV (data_list or manifest), or a folder holding
    ``manifest.csv``, ``data_list.csv`` or the Omni-Seg layout.  A ``splits.csv``
    beside it is applied automatically unless ``split_file`` is given.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_file():
        samples = load_csv(path, tissues)
        folder = path.parent
    else:
        folder = path
        if (path / "manifest.csv").exists():
            samples = load_csv(path / "manifest.csv", tissues)
        elif (path / "data_list.csv").exists():
            samples = load_csv(path / "data_list.csv", tissues)
        else:
            samples = load_folder(path, tissues)
    if split_file is None and (folder / "splits.csv").exists():
        split_file = folder / "splits.csv"
    if split_file is not None:
        apply_split(samples, split_file)
    return samples


def select(samples: Iterable[Sample], splits: "str | Sequence[str] | None" = None, tissues=None) -> list[Sample]:
    """Samples in the given split(s) (``None`` = all) and tissues (names, ``None`` = all)."""
    if isinstance(splits, str):
        splits = [s for s in splits.split("+") if s]
    names = None if not tissues else {get_tissue(t).name for t in tissues}
    return [s for s in samples if (not splits or s.split in splits) and (names is None or s.tissue.name in names)]


def sample_mpp(s: Sample) -> float | None:
    """The pixel size a row records (manifest ``mpp`` or ``um_per_px``), or None if none is given."""
    for key in ("mpp", "um_per_px"):
        v = s.meta.get(key)
        if v not in (None, ""):
            try:
                f = float(v)
            except ValueError:
                raise DataError(f"{s.image_path}: {key} is {v!r}, not a number") from None
            if not (f > 0 and np.isfinite(f)):
                raise DataError(f"{s.image_path}: {key} must be a positive number, got {v!r}")
            return f
    return None


def resample_pair(image: np.ndarray, mask: np.ndarray, mpp: float, target_mpp: float):
    """Bring a patch recorded at ``mpp`` um/px to ``target_mpp`` (the tissue's magnification).

    The image is resized with antialiasing; the mask by area (the fraction of each new
    pixel that was foreground), then thresholded at one half, so object areas keep their
    size in microns."""
    from skimage.transform import resize

    f = mpp / target_mpp
    h, w = mask.shape
    shape = (max(1, int(round(h * f))), max(1, int(round(w * f))))
    img = resize(image, shape + (image.shape[2],), order=1, anti_aliasing=f < 1, preserve_range=True)
    msk = resize(mask.astype(np.float32), shape, order=1, anti_aliasing=f < 1, preserve_range=True) >= 0.5
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), msk


def load_arrays(samples: list[Sample], drop_empty: bool = False) -> list[Sample]:
    """Read and check every image and mask (in memory; patches are small).

    A row that records its pixel size (``mpp`` or ``um_per_px``, e.g. third-party
    annotations scanned at 20x) is resampled to its tissue's magnification."""
    kept = []
    for s in samples:
        img = read_image(s.image_path)
        msk = read_mask(s.label_path)
        if img.shape[:2] != msk.shape:
            raise DataError(f"{s.label_path}: mask is {msk.shape[1]}x{msk.shape[0]} px but image {s.image_path.name} is {img.shape[1]}x{img.shape[0]} px")
        mpp = sample_mpp(s)
        if mpp is not None and abs(mpp / s.tissue.mpp - 1.0) > 0.02:
            img, msk = resample_pair(img, msk, mpp, s.tissue.mpp)
            s.meta["resampled_from_mpp"] = mpp
        if not msk.any() and drop_empty:
            warnings.warn(f"{s.label_path}: empty mask, sample skipped", stacklevel=2)
            continue
        s.image, s.mask = img, msk
        kept.append(s)
    return kept
