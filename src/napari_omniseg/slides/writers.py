"""Write RGB pyramids as OME-TIFF or OME-Zarr (for tests, benchmarks and demos).

Each level is the 2 x 2 block mean of the previous one (rounded half up; blocks cut
by the right or bottom edge average the pixels they hold), so level ``i`` has
``ceil(H / 2**i) x ceil(W / 2**i)`` pixels.  Files are written under a temporary
name and renamed into place, and an existing target is never replaced unless
``overwrite=True``.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Literal

import numpy as np

from .base import block_mean, check_mpp
from .image import as_rgb8


def build_pyramid(image: np.ndarray, n_levels: int) -> list[np.ndarray]:
    """``[image, 2x down, 4x down, ...]`` by repeated 2 x 2 block means (stops at 1 px)."""
    if n_levels < 1:
        raise ValueError(f"n_levels must be >= 1, got {n_levels}")
    levels = [image]
    while len(levels) < n_levels and min(levels[-1].shape[:2]) > 1:
        levels.append(block_mean(levels[-1], 2))
    return levels


def _prepare(path, image, mpp, overwrite) -> tuple[Path, np.ndarray, float]:
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; refusing to overwrite (pass overwrite=True)")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path, as_rgb8(image, "<image>"), check_mpp(mpp, path)


def _tmp_name(path: Path) -> str:
    """A fresh hidden name beside ``path`` (created by the writer with normal permissions)."""
    return str(path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def _install(tmp: Path, path: Path, overwrite: bool) -> None:
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} appeared while writing; refusing to overwrite")
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    os.replace(tmp, path)


def write_ome_tiff_pyramid(
    path: "str | Path",
    image_rgb_uint8: np.ndarray,
    mpp: float,
    n_levels: int,
    tile: int = 256,
    compression: str | None = "zlib",
    overwrite: bool = False,
) -> Path:
    """Write a tiled pyramidal OME-TIFF (levels in SubIFDs) with ``PhysicalSizeX = mpp`` um.

    ``compression`` is passed to tifffile (``"zlib"`` is lossless, so level 0 reads
    back exactly; ``"jpeg"`` gives scanner-like files).  The TIFF resolution tags are
    also set (pixels per centimeter).  Returns the path.
    """
    import tifffile

    if tile <= 0 or tile % 16:
        raise ValueError(f"tile must be a positive multiple of 16, got {tile}")
    path, img, mpp = _prepare(path, image_rgb_uint8, mpp, overwrite)
    levels = build_pyramid(img, n_levels)
    bigtiff = sum(lv.nbytes for lv in levels) > 2**31 - 2**25
    res = (1e4 / mpp, 1e4 / mpp)
    tmp = _tmp_name(path)
    try:
        with tifffile.TiffWriter(tmp, bigtiff=bigtiff, ome=True) as tw:
            opts = dict(tile=(tile, tile), photometric="rgb", compression=compression,
                        resolution=res, resolutionunit="CENTIMETER")
            tw.write(
                levels[0], subifds=len(levels) - 1,
                metadata={"axes": "YXS", "Name": path.name.split(".")[0],
                          "PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm",
                          "PhysicalSizeY": mpp, "PhysicalSizeYUnit": "µm"},
                **opts,
            )
            for i, lv in enumerate(levels[1:], start=1):
                tw.write(lv, subfiletype=1, metadata=None,
                         **{**opts, "resolution": (res[0] / 2**i, res[1] / 2**i)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        _install(Path(tmp), path, overwrite)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_ome_zarr_pyramid(
    path: "str | Path",
    image: np.ndarray,
    mpp: float,
    n_levels: int,
    chunk: int = 512,
    version: Literal["0.4", "0.5"] = "0.5",
    overwrite: bool = False,
) -> Path:
    """Write an OME-Zarr multiscale image with axes ``c, y, x`` (the NGFF order).

    ``version="0.5"`` writes a zarr v3 store with the metadata under ``"ome"``;
    ``"0.4"`` writes a zarr v2 store (``/``-separated chunk keys) with
    ``multiscales`` in ``.zattrs``.  Chunks are ``(3, chunk, chunk)``: one chunk holds a
    square RGB tile.  Scales are ``mpp * 2**i`` micrometer, with the half-pixel
    translation that places block-mean pixels exactly over level 0.  An ``omero``
    block shows the three channels as red, green and blue.  Returns the path.
    """
    import zarr

    if version not in ("0.4", "0.5"):
        raise ValueError(f"version must be '0.4' or '0.5', got {version!r}")
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    path, img, mpp = _prepare(path, image, mpp, overwrite)
    levels = build_pyramid(img, n_levels)
    tmp = Path(_tmp_name(path))
    try:
        fmt = 3 if version == "0.5" else 2
        root = zarr.open_group(str(tmp), mode="w", zarr_format=fmt)
        datasets = []
        for i, lv in enumerate(levels):
            kw: dict = {"dimension_names": ["c", "y", "x"]} if fmt == 3 else {
                "chunk_key_encoding": {"name": "v2", "separator": "/"}}
            arr = root.create_array(
                str(i), shape=(3,) + lv.shape[:2], chunks=(3, min(chunk, lv.shape[0]), min(chunk, lv.shape[1])),
                dtype="uint8", fill_value=0, **kw,
            )
            arr[:] = np.moveaxis(lv, -1, 0)
            s = mpp * 2**i
            datasets.append({
                "path": str(i),
                "coordinateTransformations": [
                    {"type": "scale", "scale": [1.0, s, s]},
                    {"type": "translation", "translation": [0.0, mpp * (2**i - 1) / 2, mpp * (2**i - 1) / 2]},
                ],
            })
        ms = {
            "name": path.name.split(".")[0],
            "axes": [
                {"name": "c", "type": "channel"},
                {"name": "y", "type": "space", "unit": "micrometer"},
                {"name": "x", "type": "space", "unit": "micrometer"},
            ],
            "datasets": datasets,
            "type": "mean (2 x 2 blocks)",
        }
        omero = {
            "channels": [
                {"label": n, "color": c, "active": True, "window": {"start": 0, "end": 255, "min": 0, "max": 255}}
                for n, c in (("red", "FF0000"), ("green", "00FF00"), ("blue", "0000FF"))
            ],
            "rdefs": {"model": "color"},
        }
        if version == "0.5":
            root.attrs.update({"ome": {"version": "0.5", "multiscales": [ms], "omero": omero}})
        else:
            root.attrs.update({"multiscales": [{"version": "0.4", **ms}], "omero": omero})
        _install(tmp, path, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
