"""OME-Zarr (NGFF) multiscale images through the zarr v3 API.

Both NGFF 0.4 (a zarr v2 store; ``multiscales`` in ``.zattrs``) and 0.5 (a zarr v3
store; the metadata under the ``"ome"`` key of ``zarr.json`` attributes) are read;
``zarr.open_group`` picks the format.  A bioformats2raw layout (the image in the
``0`` sub-group) is followed.

- Levels are the ``datasets`` of the first multiscale, finest first.
- ``mpp`` is the ``scale`` of the x axis of dataset 0 (times any scale at the
  multiscale level), converted from the axis ``unit`` (micrometer; nanometer,
  millimeter and other lengths are converted).  A missing unit counts as a missing
  pixel size: ``--mpp`` is then required.
- Downsamples are the ratios of the x/y scales to dataset 0 (or of the shapes when
  the scales are absent).
- Axes may be ``yxc`` / ``cyx`` / ``tczyx`` and so on: the channel axis (type or
  name ``c``) may come first or last; time and z must be singletons.
- Only 8-bit RGB(A) is accepted, as for TIFF.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import SlideError, SlideSource, level_downsample, unit_to_um


def _multiscales(group) -> "tuple[dict, str] | None":
    attrs = dict(group.attrs)
    ome = attrs.get("ome")
    if isinstance(ome, dict) and ome.get("multiscales"):
        return ome["multiscales"][0], str(ome.get("version", "0.5"))
    if attrs.get("multiscales"):
        ms = attrs["multiscales"][0]
        return ms, str(ms.get("version", "0.4"))
    return None


def _scale(transforms) -> "list[float] | None":
    for t in transforms or ():
        if isinstance(t, dict) and t.get("type") == "scale" and "scale" in t:
            return [float(v) for v in t["scale"]]
    return None


class OmeZarrSlide(SlideSource):
    """A multiscale RGB image in an OME-Zarr store (NGFF 0.4 or 0.5).

    ``mpp`` given here overrides the store's value (``file_mpp`` keeps the store's).
    """

    def __init__(self, path: "str | Path", mpp: float | None = None, require_mpp: bool = True):
        import zarr

        self.path = Path(path)
        self.metadata = {}
        try:
            root = zarr.open_group(str(self.path), mode="r")
        except Exception as e:
            raise SlideError(f"{self.path}: not a readable Zarr group ({type(e).__name__}: {e})") from e
        group, found = root, _multiscales(root)
        if found is None and "0" in root and isinstance(root["0"], zarr.Group):
            group, found = root["0"], _multiscales(root["0"])  # bioformats2raw layout
        if found is None:
            raise SlideError(
                f"{self.path}: no OME-Zarr 'multiscales' metadata (looked in the group attributes and under "
                "'ome'); is this an OME-Zarr image?"
            )
        ms, version = found
        self.format = f"ome-zarr {version}"
        self.metadata["ngff_version"] = version
        self._setup(group, ms)
        self._finish_init(mpp, require_mpp)

    def _setup(self, group, ms: dict) -> None:
        import zarr

        datasets = ms.get("datasets") or []
        if not datasets:
            raise SlideError(f"{self.path}: the multiscales metadata lists no datasets")
        arrays = []
        for d in datasets:
            p = d.get("path")
            try:
                a = group[p]
            except KeyError:
                raise SlideError(f"{self.path}: dataset {p!r} named in the multiscales metadata is missing") from None
            if not isinstance(a, zarr.Array):
                raise SlideError(f"{self.path}: dataset {p!r} is not an array")
            arrays.append(a)
        nd = arrays[0].ndim
        axes = ms.get("axes")
        if axes is None and nd == 5:  # NGFF 0.1 / 0.2
            axes = list("tczyx")
        if not axes or len(axes) != nd:
            raise SlideError(f"{self.path}: axes {axes!r} do not match the array's {nd} dimensions")
        names = [str(a["name"] if isinstance(a, dict) else a).lower() for a in axes]
        types = [str(a.get("type", "")).lower() if isinstance(a, dict) else "" for a in axes]
        units = [a.get("unit") if isinstance(a, dict) else None for a in axes]
        if "y" not in names or "x" not in names:
            raise SlideError(f"{self.path}: cannot find the y and x axes among {names}")
        iy, ix = names.index("y"), names.index("x")
        ic = next((i for i, (n, t) in enumerate(zip(names, types)) if t == "channel" or n == "c"), None)
        shape = tuple(int(n) for n in arrays[0].shape)
        dtype = np.dtype(arrays[0].dtype)
        what = f"{dtype} array with axes {''.join(names)} and shape {shape}"
        if dtype != np.uint8:
            raise SlideError(f"{self.path}: expected 8-bit RGB, got {dtype} ({what}); convert the image to 8-bit RGB")
        other = [(names[i], shape[i]) for i in range(nd) if i not in (iy, ix, ic) and shape[i] > 1]
        if other:
            raise SlideError(
                f"{self.path}: expected a single 2-D RGB image, got extra dimensions "
                f"{', '.join(f'{a}={n}' for a, n in other)} ({what})"
            )
        n = shape[ic] if ic is not None else 1
        if n not in (3, 4):
            kind = "1 channel (grayscale)" if n == 1 else f"{n} channels"
            raise SlideError(f"{self.path}: expected 8-bit RGB, got {kind} ({what})")
        self._iy, self._ix, self._ic, self._nd = iy, ix, ic, nd
        self.metadata["alpha_dropped"] = n == 4
        self._arrays = arrays
        self.shapes = [(int(a.shape[iy]), int(a.shape[ix])) for a in arrays]

        # physical scales
        top = _scale(ms.get("coordinateTransformations"))
        scales = []
        for d in datasets:
            s = _scale(d.get("coordinateTransformations"))
            if s is not None and top is not None and len(top) == len(s):
                s = [a * b for a, b in zip(s, top)]
            scales.append(s)
        if all(s is not None and len(s) == nd and s[ix] > 0 and s[iy] > 0 for s in scales):
            s0 = scales[0]
            self.downsamples = [1.0] + [(s[ix] / s0[ix] + s[iy] / s0[iy]) / 2 for s in scales[1:]]
            unit = units[ix]
            if unit is None:
                self._mpp_why = "the x axis has no unit, so its scale is not a physical size"
                self.file_mpp = None
            else:
                self.file_mpp = unit_to_um(s0[ix], unit)
                if self.file_mpp is None:
                    self._mpp_why = f"the x axis unit {unit!r} is not a length unit"
        else:
            self.downsamples = [1.0] + [level_downsample(self.shapes[0], sh) for sh in self.shapes[1:]]
            self.file_mpp = None
            self._mpp_why = "the datasets have no scale coordinateTransformations"
        self.metadata["chunks"] = tuple(int(c) for c in arrays[0].chunks)

    def _read(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        idx: list = [0] * self._nd
        idx[self._iy], idx[self._ix] = slice(y0, y1), slice(x0, x1)
        if self._ic is not None:
            idx[self._ic] = slice(None)
        a = np.asarray(self._arrays[level][tuple(idx)])
        kept = sorted(i for i in (self._iy, self._ix, self._ic) if i is not None)
        a = np.transpose(a, [kept.index(self._iy), kept.index(self._ix), kept.index(self._ic)])
        return np.ascontiguousarray(a[:, :, :3])

    def close(self) -> None:
        """Drop the array handles (local stores hold no open files)."""
        self._arrays = []
        super().close()
