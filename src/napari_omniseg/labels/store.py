"""The segmentation output: an OME-Zarr (NGFF 0.5, zarr v3) label store.

Layout::

    result.ome.zarr/
      zarr.json                 attributes: ome.version, omniseg {source, mpp, model, tissues, run}
      labels/zarr.json          attributes: ome.labels = [tissue names..., "tissue_map"]
      labels/<tissue>/          one multiscale uint8 label image per tissue, at that tissue's
        0/ 1/ 2/ ...            magnification; 0 background, 1 tissue, 255 unknown
      labels/tissue_map/        the complete map (see :mod:`.aggregate`) at the finest
                                magnification among the tissues; value = tissue id + 1

Each label image has ``image-label`` metadata (colours, names) and coordinate
transformations in micrometres, so napari and other NGFF readers place all tissues
over each other.  Level 0 is written block by block as blocks finish; which blocks
are done is recorded in ``progress.json`` (replaced atomically after each block's
data is written), so a killed run leaves a valid store and rerunning resumes.  When
one slide is spread over a cluster, each part of it records its own blocks in
``progress-<part>.json`` (no two processes write one file) and every part resumes
from the union of all of them; a level-0 chunk is one block, so parts never write the
same chunk.
Coarser levels and the complete map are built at the end.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import zarr

from .._io import atomic_write_bytes
from ..tissues import Tissue
from .aggregate import UNKNOWN, complete_map

MAP_NAME = "tissue_map"
STORE_FORMAT = "napari-omniseg-labels"
STORE_VERSION = 1


def _rgba(t: Tissue, alpha: int = 255) -> list[int]:
    return [*t.rgb, alpha]


def _multiscale_meta(name: str, mpp: float, n_levels: int) -> dict:
    return {
        "name": name,
        "axes": [{"name": "y", "type": "space", "unit": "micrometer"}, {"name": "x", "type": "space", "unit": "micrometer"}],
        "datasets": [
            {"path": str(k), "coordinateTransformations": [
                {"type": "scale", "scale": [mpp * 2**k, mpp * 2**k]},
                {"type": "translation", "translation": [mpp * (2**k - 1) / 2, mpp * (2**k - 1) / 2]},
            ]}
            for k in range(n_levels)
        ],
    }


def n_levels_for(shape: tuple[int, int], chunk: int) -> int:
    return 1 + max(0, math.ceil(math.log2(max(shape) / chunk))) if max(shape) > chunk else 1


class StoreError(Exception):
    """A label store that cannot be read: the message names the folder and the problem."""


log = logging.getLogger("napari_omniseg")


class LabelStore:
    """Create, fill, resume and read a label store."""

    def __init__(self, path: "str | Path", mode: str = "r", part: "str | None" = None):
        self.path = Path(path)
        self.part = part
        if mode == "r" and not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no such label store")
        try:
            self.root = zarr.open_group(str(self.path), mode=mode)
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise StoreError(f"{self.path}: not a readable OME-Zarr label store ({type(e).__name__}: {e})") from None
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.path}: no such label store") from None
        if mode != "w" and (self.path / "zarr.json").exists() and not isinstance(self.root.attrs.get("omniseg", {}), dict):
            raise StoreError(f"{self.path}: its zarr.json 'omniseg' attributes are not an object")
        self._lock = threading.Lock()
        #: array handles by (label name, level): opening one through the zarr groups costs
        #: about 3 ms, which the engine paid for every tissue of every block it wrote
        self._arrays: dict = {}
        self._score_arrays: dict = {}
        #: review scores not yet written: name -> block row -> block column -> values
        self._pending_scores: dict = {}
        self._progress_file = self.path / (f"progress-{part}.json" if part is not None else "progress.json")
        #: the record of finished blocks is rewritten at most this often (seconds), and when
        #: a run ends: it lists every block, so rewriting it per block costs time that grows
        #: with the slide.  A process killed in between loses only the record of the last
        #: second's blocks, which a resumed run recomputes (same output).
        self.progress_every = 1.0
        self._progress_at = -math.inf
        self._dirty = False
        self._done: dict[str, set] = {}  #: blocks done by any part: what a run skips
        self._mine: dict[str, set] = {}  #: blocks this part recorded: what it writes to its file
        files = sorted(self.path.glob("progress*.json")) if self.path.exists() else []
        for f in files:
            try:
                raw = json.loads(f.read_text())
                got = {str(k): {(int(b[0]), int(b[1])) for b in v} for k, v in raw.get("done", {}).items()}
            except (ValueError, TypeError, AttributeError, IndexError, KeyError, UnicodeDecodeError, OSError) as e:
                # the record of finished blocks is only a shortcut: without it those blocks
                # are recomputed, which gives the same output
                log.warning("%s is unreadable (%s); its blocks will be recomputed", f, e)
                continue
            for k, v in got.items():
                self._done.setdefault(k, set()).update(v)
                if f == self._progress_file or part is None:
                    self._mine.setdefault(k, set()).update(v)

    # ------------------------------------------------------------------ create
    @classmethod
    def create(
        cls,
        path: "str | Path",
        tissues: Sequence[Tissue],
        level0_shape: tuple[int, int],
        level0_mpp: float,
        chunk: int,
        attrs: dict,
    ) -> "LabelStore":
        """Create the store, or reopen it for resuming when its settings match."""
        path = Path(path)
        meta = {"format": STORE_FORMAT, "format_version": STORE_VERSION, "level0_shape": list(level0_shape),
                "level0_mpp": level0_mpp, "chunk": chunk, "tissues": [t.name for t in tissues], **attrs}
        if (path / "zarr.json").exists():
            st = cls(path, mode="r+")
            old = st.meta
            keys = ("level0_shape", "level0_mpp", "chunk", "tissues", "model_sha256", "source")
            diff = [k for k in keys if old.get(k) != meta.get(k)]
            if diff:
                raise FileExistsError(
                    f"{path} holds a different segmentation ({', '.join(diff)} differ); choose another output path"
                )
            return st
        root = zarr.open_group(str(path), mode="w-", zarr_format=3)
        root.attrs.update({"ome": {"version": "0.5"}, "omniseg": {**meta, "complete": False}})
        labels = root.create_group("labels")
        labels.attrs["ome"] = {"version": "0.5", "labels": [t.name for t in tissues] + [MAP_NAME]}
        for t in tissues:
            f = t.mpp / level0_mpp
            shape = (max(1, math.ceil(level0_shape[0] / f)), max(1, math.ceil(level0_shape[1] / f)))
            cls._create_label(labels, t.name, shape, t.mpp, chunk, [t])
        return cls(path, mode="r+")

    @staticmethod
    def _create_label(labels, name, shape, mpp, chunk, tissues: Sequence[Tissue]):
        g = labels.create_group(name)
        nl = n_levels_for(shape, chunk)
        colors = [{"label-value": t.id + 1 if len(tissues) > 1 else 1, "rgba": _rgba(t)} for t in tissues]
        colors.append({"label-value": UNKNOWN, "rgba": [128, 128, 128, 160]})
        props = [{"label-value": t.id + 1 if len(tissues) > 1 else 1, "name": t.name} for t in tissues]
        props.append({"label-value": UNKNOWN, "name": "unknown"})
        g.attrs["ome"] = {
            "version": "0.5",
            "multiscales": [_multiscale_meta(name, mpp, nl)],
            "image-label": {"version": "0.5", "colors": colors, "properties": props},
        }
        g.attrs["omniseg"] = {"mpp": mpp}
        s = shape
        for k in range(nl):
            g.create_array(str(k), shape=s, chunks=(chunk, chunk), dtype="uint8", fill_value=0)
            s = (max(1, math.ceil(s[0] / 2)), max(1, math.ceil(s[1] / 2)))

    # ------------------------------------------------------------------ metadata
    @property
    def meta(self) -> dict:
        return dict(self.root.attrs.get("omniseg", {}))

    @property
    def tissue_names(self) -> list[str]:
        return list(self.meta.get("tissues", []))

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    def label_names(self) -> list[str]:
        return list(self.root["labels"].attrs["ome"]["labels"])

    def has(self, name: str) -> bool:
        return name in self.root["labels"]

    def level(self, name: str, k: int = 0):
        a = self._arrays.get((name, k))
        if a is not None:
            return a
        try:
            a = self._arrays[(name, k)] = self.root["labels"][name][str(k)]
            return a
        except KeyError:
            raise StoreError(f"{self.path}: label image {name!r} has no level {k} (the store is incomplete or "
                             "damaged; segment again into a new folder)") from None

    def n_levels(self, name: str) -> int:
        try:
            return len(self.root["labels"][name].attrs["ome"]["multiscales"][0]["datasets"])
        except (KeyError, IndexError, TypeError):
            raise StoreError(f"{self.path}: label image {name!r} has no readable multiscales metadata") from None

    def mpp(self, name: str) -> float:
        return float(self.root["labels"][name].attrs["omniseg"]["mpp"])

    def dask_levels(self, name: str) -> list:
        import dask.array as da

        return [da.from_zarr(self.level(name, k)) for k in range(self.n_levels(name))]

    # ------------------------------------------------------------------ writing (engine sink)
    def done_blocks(self, plan) -> set:
        sets = [self._done.get(t.name, set()) for t in plan.tissues]
        return set.intersection(*sets) if sets else set()

    def write_block(self, plan, bi, bj, labels) -> None:
        y0, y1, x0, x1 = plan.block_bounds(bi, bj)
        with self._lock:
            for t in plan.tissues:
                arr = self.level(t.name, 0)
                arr[y0:y1, x0:x1] = labels[t.name]
            for t in plan.tissues:  # recorded only after the data is written
                self._done.setdefault(t.name, set()).add((bi, bj))
                self._mine.setdefault(t.name, set()).add((bi, bj))
            self._dirty = True
            if time.monotonic() - self._progress_at >= self.progress_every:
                self._write_progress()

    def _write_progress(self) -> None:
        self._write_pending_scores()  # a block recorded done has its review scores on disk
        body = {"done": {k: sorted(v) for k, v in self._mine.items()}}
        atomic_write_bytes(self._progress_file, json.dumps(body).encode())
        self._progress_at, self._dirty = time.monotonic(), False

    def flush(self) -> None:
        """Write the record of finished blocks now (the engine calls this when a run ends,
        cancelled or not; :meth:`finalize` does too)."""
        with self._lock:
            if self._dirty:
                self._write_progress()
            else:
                self._write_pending_scores()

    def prepare_scores(self, plans) -> None:
        """Create the review-score arrays of these plans' tissues (before parts of one slide
        run in several processes, which must not race to create them). One chunk holds
        one row of blocks, so parts that own whole rows never write the same chunk."""
        from .review import FIELDS, GROUP

        with self._lock:
            grp = self.root.require_group(GROUP)
            for plan in plans:
                for t in plan.tissues:
                    if t.name in grp:
                        continue
                    nby, nbx = plan.n_blocks
                    arr = grp.create_array(t.name, shape=(nby, nbx, len(FIELDS)), chunks=(1, nbx, len(FIELDS)),
                                           dtype="float32", fill_value=float("nan"))
                    arr.attrs.update({"core": int(plan.core), "factor": float(plan.factor), "mpp": float(plan.mpp),
                                      "fields": list(FIELDS)})

    def write_scores(self, plan, bi, bj, scores: dict) -> None:
        """Store one block's review scores (see :mod:`napari_omniseg.labels.review`); called
        by the engine before :meth:`write_block`.  Held in memory and written, a row of blocks
        at a time, before each record of finished blocks, so a block recorded done has its
        scores on disk."""
        from .review import GROUP

        names = [t.name for t in plan.tissues if t.name in scores]
        if any(n not in self._score_arrays for n in names):
            if GROUP not in self.root or any(n not in self.root[GROUP] for n in names):
                self.prepare_scores([plan])
            with self._lock:
                grp = self.root[GROUP]
                for n in names:
                    self._score_arrays.setdefault(n, grp[n])
        with self._lock:
            for n in names:
                row = self._pending_scores.setdefault(n, {}).setdefault(int(bi), {})
                row[int(bj)] = np.asarray(scores[n], np.float32)

    def _write_pending_scores(self) -> None:
        """Write the review scores held since the last write: one read and one write of each
        row's chunk, not one per block (a chunk holds a whole row of blocks).  Called with
        the lock held, before the record of finished blocks is written."""
        for n, rows in self._pending_scores.items():
            arr = self._score_arrays[n]
            for bi, cols in rows.items():
                row = np.asarray(arr[bi])
                for bj, v in cols.items():
                    row[bj, :] = v
                arr[bi] = row
        self._pending_scores = {}

    def finalize(self, tissues: Sequence[Tissue], run_info: dict | None = None, map_mpp: float | None = None,
                 box: "tuple[int, int, int, int] | None" = None) -> None:
        """Build the coarser levels and the complete map; mark the store complete.

        With ``box`` (level-0 x, y, w, h: a region run) only the chunks that the region's
        blocks touch are rebuilt, so a region's cost does not grow with the slide."""
        self.flush()
        if box is not None:
            m = int(self.meta["chunk"]) * max(t.mpp for t in tissues) / float(self.meta["level0_mpp"])
            x, y, w, h = box  # whole blocks were written around the region: one block of margin
            box = (int(x - m), int(y - m), int(w + 2 * m + 1), int(h + 2 * m + 1))
        for t in tissues:
            self._build_levels(t.name, self._grid_box(t.name, box))
        self._build_map(tissues, map_mpp, box)
        om = self.meta
        om["complete"] = True
        if run_info:
            om["run"] = run_info
        self.root.attrs["omniseg"] = om

    def _grid_box(self, name: str, box):
        """A level-0 box as (y0, y1, x0, x1) on a label image's level-0 grid (None: all)."""
        if box is None:
            return None
        f = self.mpp(name) / float(self.meta["level0_mpp"])
        x, y, w, h = box
        H, W = self.level(name, 0).shape
        return (max(0, int(y / f)), min(H, math.ceil((y + h) / f)), max(0, int(x / f)), min(W, math.ceil((x + w) / f)))

    def _build_levels(self, name: str, grid_box=None) -> None:
        nl = self.n_levels(name)
        y0, y1, x0, x1 = grid_box if grid_box is not None else (0, 1 << 62, 0, 1 << 62)
        for k in range(1, nl):
            src, dst = self.level(name, k - 1), self.level(name, k)
            ch = dst.chunks[0]
            y0, x0 = y0 // 2, x0 // 2  # level k pixel i is level k-1 pixel 2i
            y1, x1 = min(dst.shape[0], (y1 + 1) // 2), min(dst.shape[1], (x1 + 1) // 2)
            for y in range((y0 // ch) * ch, y1, ch):
                for x in range((x0 // ch) * ch, x1, ch):
                    block = src[2 * y : 2 * (y + ch), 2 * x : 2 * (x + ch)]
                    dst[y : y + ch, x : x + ch] = block[::2, ::2][: min(ch, dst.shape[0] - y), : min(ch, dst.shape[1] - x)]

    def _build_map(self, tissues: Sequence[Tissue], map_mpp: float | None, box=None) -> None:
        labels = self.root["labels"]
        meta = self.meta
        mpp = map_mpp or min(t.mpp for t in tissues)
        shape0 = meta["level0_shape"]
        f = mpp / meta["level0_mpp"]
        shape = (max(1, math.ceil(shape0[0] / f)), max(1, math.ceil(shape0[1] / f)))
        chunk = int(meta["chunk"])
        keep = (box is not None and MAP_NAME in labels and tuple(self.level(MAP_NAME, 0).shape) == shape
                and abs(self.mpp(MAP_NAME) - mpp) < 1e-9)
        if not keep:
            if MAP_NAME in labels:
                del labels[MAP_NAME]
            self._arrays = {k: v for k, v in self._arrays.items() if k[0] != MAP_NAME}
            self._create_label(labels, MAP_NAME, shape, mpp, chunk, list(tissues))
        dst = self.level(MAP_NAME, 0)
        gy0, gy1, gx0, gx1 = self._grid_box(MAP_NAME, box) if box is not None else (0, shape[0], 0, shape[1])
        for y in range((gy0 // chunk) * chunk, gy1, chunk):
            for x in range((gx0 // chunk) * chunk, gx1, chunk):
                h, w = min(chunk, shape[0] - y), min(chunk, shape[1] - x)
                masks = {}
                for t in tissues:
                    src = self.level(t.name, 0)
                    r = t.mpp / mpp  # map pixels per tissue pixel along each axis
                    ys = np.minimum(((np.arange(y, y + h) + 0.5) / r).astype(int), src.shape[0] - 1)
                    xs = np.minimum(((np.arange(x, x + w) + 0.5) / r).astype(int), src.shape[1] - 1)
                    sub = src[ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1]
                    masks[t.name] = sub[np.ix_(ys - ys[0], xs - xs[0])]
                dst[y : y + h, x : x + w] = complete_map(masks, tissues)
        self._build_levels(MAP_NAME, self._grid_box(MAP_NAME, box))

    # ------------------------------------------------------------------ reading
    def read(self, name: str, level: int = 0) -> np.ndarray:
        return np.asarray(self.level(name, level)[...])

    def describe(self) -> str:
        m = self.meta
        lines = [f"{self.path}: {'complete' if m.get('complete') else 'INCOMPLETE (rerun to resume)'}"]
        for n in self.label_names():
            if self.has(n):
                a = self.level(n, 0)
                lines.append(f"  {n:<24} {a.shape[1]} x {a.shape[0]} px at {self.mpp(n)} um/px, {self.n_levels(n)} levels")
        return "\n".join(lines)


def json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    raise TypeError(type(o))


def dumps(o) -> str:
    return json.dumps(o, default=json_default)
