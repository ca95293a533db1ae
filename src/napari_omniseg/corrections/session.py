"""Review state and crash-safe editable working regions (Qt-free).

napari cannot paint on multiscale Labels layers, so corrections are made on a
*working region*: one single-scale numpy array per tissue, on that tissue's own
pixel grid (its magnification), placed on the slide by an ``origin`` (y, x in the
tissue grid) and a ``factor`` (level-0 pixels per tissue pixel).  The napari layer
shares the very same array, so a brush stroke changes the session's data directly.

Everything lives in a *project folder* per slide (default ``<slide>.omniseg/``)::

    session.json                state: slide identity, regions, reviewed flags, commits
    work/<tissue>.npz           the working region as edited (autosaved)
    pred/<tissue>.npz           the model's prediction for that region (for "discard")
    commits/<id>-<tissue>.npz   committed (accepted) corrections, immutable
    training/                   exported training patches + manifest.csv

Autosave: :meth:`CorrectionSession.poll` compares a checksum of each array with
the last saved one and saves changed arrays, at most once per ``autosave_interval``
seconds per tissue.  Calling it from a timer and on every paint event loses at
most a few seconds of work in a crash, and it also catches undo/redo (which change
the array without a paint event).  Every file is written atomically (temporary
file, fsync, rename); reopening the folder restores the regions as last saved.

The partial-label rule: a tissue that was not marked *reviewed* is unknown, not
background, so only reviewed tissues are exported as training data.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .._io import atomic_write_bytes, process_lock
from ..tissues import TISSUES, Tissue, get_tissue

SESSION_FORMAT = "napari-omniseg-corrections"
SESSION_VERSION = 1
UNKNOWN = 255
_SLIDE_SUFFIXES = (".ome.tiff", ".ome.tif", ".ome.zarr", ".svs", ".tiff", ".tif", ".ndpi", ".mrxs", ".scn", ".zarr",
                   ".png", ".jpg", ".jpeg")


class SessionError(RuntimeError):
    """A correction session cannot do what was asked; the message says why."""


class ProjectInUseError(SessionError):
    """Another process has the project open."""


#: projects this process holds (folder -> its lock); held until the process ends, so a
#: second napari or CLI process on the same project is refused instead of overwriting
_PROJECT_LOCKS: dict = {}
_PROJECT_LOCKS_GUARD = threading.Lock()
OWNER_FILE = ".project-owner.json"


def _hold_project(folder: Path) -> None:
    """Take the project's inter-process lock (once per process), or raise
    :class:`ProjectInUseError` naming the process that holds it."""
    import socket

    import filelock

    key = str(folder.resolve())
    with _PROJECT_LOCKS_GUARD:
        if key in _PROJECT_LOCKS:
            return
        folder.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(folder / ".project.lock"), timeout=0)
        try:
            lock.acquire()
        except filelock.Timeout:
            try:
                owner = json.loads((folder / OWNER_FILE).read_text())
                who = f"process {int(owner['pid'])} on {owner.get('host', '?')}"
            except Exception:  # noqa: BLE001 - the owner note is a courtesy
                who = "another process"
            raise ProjectInUseError(f"{folder} is open in {who}; close it there first, or choose another project "
                                    "folder") from None
        _PROJECT_LOCKS[key] = lock
        atomic_write_bytes(folder / OWNER_FILE, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                            "since": _now()}).encode())


class UncommittedEditsError(SessionError):
    pass


# --------------------------------------------------------------------------- folders
def slide_stem(path_or_name: "str | Path") -> str:
    name = Path(str(path_or_name)).name
    low = name.lower()
    for suf in _SLIDE_SUFFIXES:
        if low.endswith(suf):
            return name[: -len(suf)] or name
    return Path(name).stem or name


def safe_name(s: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", str(s)).strip("._")
    return s[:80] or "image"


def projects_home() -> Path:
    from ..model.registry import default_home

    return default_home() / "projects"


def default_project_dir(slide: "str | Path | None", name: str | None = None) -> Path:
    """A folder under ``$OMNISEG_HOME/projects`` named after the slide and a hash of its
    path (two slides with one name do not share a project; a shared slide store is never
    written to).  A project already beside the slide (``<slide folder>/<slide
    stem>.omniseg``, where earlier versions put it) is kept.  Images without a file (an
    in-memory napari layer) use ``name``."""
    if slide:
        p = Path(slide).resolve()
        beside = p.parent / f"{slide_stem(p)}.omniseg"
        if (beside / "session.json").exists():
            return beside
        h = zlib.crc32(str(p).encode()) & 0xFFFFFFFF
        return projects_home() / f"{safe_name(slide_stem(p))}-{h:08x}.omniseg"
    return projects_home() / f"{safe_name(name or 'image')}.omniseg"


def committed_regions(folder: "str | Path") -> list[tuple[str, tuple[int, int, int, int]]]:
    """(tissue, level-0 region) of every reviewed, committed region of a project, read
    without taking the project (another process may have it open)."""
    state_file = Path(folder) / "session.json"
    try:
        st = json.loads(state_file.read_text())
        return [(str(c["tissue"]), tuple(int(v) for v in c["region"])) for c in st.get("commits", [])
                if c.get("reviewed")]
    except FileNotFoundError:
        raise SessionError(f"{folder}: no correction project here (session.json missing)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SessionError(f"{state_file}: cannot read the project state ({e})") from None


def checksum(a: np.ndarray) -> str:
    """SHA-256 of the array's bytes, shape and dtype: edit detection that no edit can
    escape (a rolling checksum such as adler32 misses some erase + paint pairs)."""
    h = hashlib.sha256(np.ascontiguousarray(a).data)
    h.update(f"{a.shape}{a.dtype}".encode())
    return h.hexdigest()[:32]


def _baseline_from_json(value, data: np.ndarray) -> str:
    """Read a stored baseline checksum; projects of earlier versions stored adler32 ints."""
    if isinstance(value, str):
        return value
    try:
        old = int(value)
    except (TypeError, ValueError):
        return ""
    if old == (zlib.adler32(np.ascontiguousarray(data).data) & 0xFFFFFFFF):
        return checksum(data)  # the array is still its baseline
    return f"adler32:{old}"  # differs from its baseline: never equal to a real checksum


def _npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def _load_npz(path: Path) -> dict:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # zipfile / value errors from a damaged file
        raise SessionError(f"{path}: cannot read saved corrections ({type(e).__name__}: {e})") from None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# --------------------------------------------------------------------------- regions
@dataclass
class WorkingRegion:
    """One tissue's editable labels over a region (0 background, 1 tissue, 255 unknown)."""

    tissue: Tissue
    data: np.ndarray
    origin: tuple[int, int]  #: (y, x) of data[0, 0] in the tissue's pixel grid
    factor: float  #: level-0 pixels per pixel of ``data``
    mpp: float
    region: tuple[int, int, int, int]  #: the level-0 (x, y, w, h) that was asked for
    model_version: str = ""
    reviewed: bool = False
    created: str = ""
    #: checksum of the array as last written to work/
    saved_checksum: str = ""
    #: checksum of the prediction or of the last commit: differs => uncommitted edits
    baseline_checksum: str = ""
    last_save: float = 0.0  #: time.monotonic() of the last save

    @property
    def level0_box(self) -> tuple[int, int, int, int]:
        """Level-0 (y, x, h, w) covered by ``data`` (the edge pixel may reach past the slide)."""
        f = self.factor
        return (int(round(self.origin[0] * f)), int(round(self.origin[1] * f)),
                int(round(self.data.shape[0] * f)), int(round(self.data.shape[1] * f)))

    def napari_transform(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """(scale, translate) in level-0 pixel units, pixel-centre convention (as the engine's)."""
        f = self.factor
        return (f, f), ((self.origin[0] + 0.5) * f - 0.5, (self.origin[1] + 0.5) * f - 0.5)

    def changed(self) -> bool:
        return checksum(self.data) != self.saved_checksum

    def has_uncommitted_edits(self) -> bool:
        return checksum(self.data) != self.baseline_checksum

    def to_json(self) -> dict:
        return {
            "tissue": self.tissue.name,
            "origin": list(self.origin),
            "factor": self.factor,
            "mpp": self.mpp,
            "shape": list(self.data.shape),
            "region": list(self.region),
            "model_version": self.model_version,
            "reviewed": self.reviewed,
            "created": self.created,
            "saved_checksum": self.saved_checksum,
            "baseline_checksum": self.baseline_checksum,
        }


@dataclass
class SlideInfo:
    id: str  #: path of the slide file, or a name for in-memory images
    level0_shape: tuple[int, int]
    mpp: float
    path: str = ""

    def to_json(self) -> dict:
        return {"id": self.id, "path": self.path, "level0_shape": list(self.level0_shape), "mpp": self.mpp}

    @classmethod
    def from_json(cls, d: dict) -> "SlideInfo":
        return cls(str(d["id"]), tuple(int(v) for v in d["level0_shape"]), float(d["mpp"]), str(d.get("path", "")))


@dataclass
class CommitRecord:
    id: int
    tissue: str
    file: str  #: relative to the project folder
    origin: tuple[int, int]
    factor: float
    mpp: float
    shape: tuple[int, int]
    region: tuple[int, int, int, int]
    model_version: str
    reviewed: bool
    timestamp: str
    store_written: bool = False
    exported: bool = False
    superseded: bool = False
    export_rows: int = 0

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        for k in ("origin", "shape", "region"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_json(cls, d: dict) -> "CommitRecord":
        d = dict(d)
        d["origin"] = tuple(d["origin"])
        d["shape"] = tuple(d["shape"])
        d["region"] = tuple(d["region"])
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


# --------------------------------------------------------------------------- session
@dataclass
class CorrectionSession:
    """The corrections of one slide, kept in a project folder."""

    folder: Path
    slide: SlideInfo
    tissues: tuple[Tissue, ...] = TISSUES
    autosave_interval: float = 2.0
    regions: dict[str, WorkingRegion] = field(default_factory=dict)
    commits: list[CommitRecord] = field(default_factory=list)
    store_path: str = ""  #: OME-Zarr label store commits are written to ("" = none)
    saves: int = 0  #: number of array saves done by this object (for tests and the UI)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    # ------------------------------------------------------------------ open / create
    @classmethod
    def open(cls, folder: "str | Path", slide: SlideInfo | None = None, tissues: Sequence[Tissue] = TISSUES,
             autosave_interval: float = 2.0) -> "CorrectionSession":
        """Open the project in ``folder`` (restoring saved work) or start a new one.

        With ``slide`` given, an existing project must belong to the same image (same
        level-0 size and um/px); otherwise :class:`SessionError` names the difference.
        """
        folder = Path(folder)
        state_file = folder / "session.json"
        if not state_file.exists() and slide is None:
            raise SessionError(f"{folder}: no correction project here (session.json missing)")
        _hold_project(folder)
        if not state_file.exists():
            s = cls(folder, slide, tuple(tissues), autosave_interval)
            s._write_state()
            return s
        try:
            st = json.loads(state_file.read_text())
        except (OSError, ValueError) as e:
            raise SessionError(f"{state_file}: cannot read the project state ({e})") from None
        if st.get("format") != SESSION_FORMAT:
            raise SessionError(f"{state_file}: not a napari-omniseg correction project")
        if int(st.get("format_version", 0)) > SESSION_VERSION:
            raise SessionError(f"{state_file}: made by a newer napari-omniseg (format {st.get('format_version')})")
        saved_slide = SlideInfo.from_json(st["slide"])
        if slide is not None:
            if tuple(slide.level0_shape) != tuple(saved_slide.level0_shape) or not math.isclose(
                slide.mpp, saved_slide.mpp, rel_tol=1e-3
            ):
                raise SessionError(
                    f"{folder} belongs to another image ({saved_slide.level0_shape[1]} x {saved_slide.level0_shape[0]} px "
                    f"at {saved_slide.mpp:g} um/px; this one is {slide.level0_shape[1]} x {slide.level0_shape[0]} px at "
                    f"{slide.mpp:g} um/px); choose another project folder"
                )
        s = cls(folder, slide or saved_slide, tuple(tissues), autosave_interval)
        s.store_path = st.get("store_path", "")
        s.commits = [CommitRecord.from_json(c) for c in st.get("commits", [])]
        for name, meta in st.get("regions", {}).items():
            s.regions[name] = s._load_region(name, meta)
        return s

    def _load_region(self, name: str, meta: dict) -> WorkingRegion:
        work = self.folder / "work" / f"{name}.npz"
        if not work.exists():
            raise SessionError(f"{work}: the saved working region of {name} is missing")
        z = _load_npz(work)
        data = np.ascontiguousarray(z["data"].astype(np.uint8, copy=False))
        origin = tuple(int(v) for v in z["origin"]) if "origin" in z else tuple(meta["origin"])
        factor = float(z["factor"]) if "factor" in z else float(meta["factor"])
        wr = WorkingRegion(
            tissue=get_tissue(name, self.tissues),
            data=data,
            origin=origin,  # type: ignore[arg-type]
            factor=factor,
            mpp=float(meta["mpp"]),
            region=tuple(meta["region"]),  # type: ignore[arg-type]
            model_version=meta.get("model_version", ""),
            reviewed=bool(meta.get("reviewed", False)),
            created=meta.get("created", ""),
            baseline_checksum=_baseline_from_json(meta.get("baseline_checksum", ""), data),
        )
        # the array on disk may be newer than session.json (crash between the two writes)
        wr.saved_checksum = checksum(data)
        wr.last_save = time.monotonic()
        return wr

    # ------------------------------------------------------------------ state file
    def _write_state(self) -> None:
        with self._lock:
            self._write_state_locked()

    def _write_state_locked(self) -> None:
        st = {
            "format": SESSION_FORMAT,
            "format_version": SESSION_VERSION,
            "slide": self.slide.to_json(),
            "updated": _now(),
            "store_path": self.store_path,
            "regions": {n: r.to_json() for n, r in self.regions.items()},
            "commits": [c.to_json() for c in self.commits],
        }
        atomic_write_bytes(self.folder / "session.json", json.dumps(st, indent=1).encode())

    @property
    def training_dir(self) -> Path:
        return self.folder / "training"

    # ------------------------------------------------------------------ regions
    def uncommitted(self, names: Iterable[str] | None = None) -> list[str]:
        names = list(self.regions) if names is None else [n for n in names if n in self.regions]
        return [n for n in names if self.regions[n].has_uncommitted_edits()]

    def set_region(self, tissue: "Tissue | str", data: np.ndarray, origin: tuple[int, int], factor: float, mpp: float,
                   region: tuple[int, int, int, int], model_version: str = "", force: bool = False) -> WorkingRegion:
        """Replace a tissue's working region with a new prediction.

        Refuses (:class:`UncommittedEditsError`) when the current region of that tissue
        holds edits that were neither committed nor discarded, unless ``force``.
        The array is used as is (not copied): it becomes the array the napari layer shows.
        """
        t = get_tissue(tissue, self.tissues)
        old = self.regions.get(t.name)
        if old is not None and not force and old.has_uncommitted_edits():
            raise UncommittedEditsError(
                f"{t.label}: the current region has corrections that were not committed; "
                "commit them (mark reviewed, then Commit) or discard them first"
            )
        data = np.ascontiguousarray(data, dtype=np.uint8)
        if data.ndim != 2:
            raise SessionError(f"{t.name}: working region must be 2-D, got shape {data.shape}")
        cs = checksum(data)
        wr = WorkingRegion(t, data, (int(origin[0]), int(origin[1])), float(factor), float(mpp),
                           tuple(int(v) for v in region), model_version, False, _now(),  # type: ignore[arg-type]
                           saved_checksum=cs, baseline_checksum=cs, last_save=time.monotonic())
        blob = _npz_bytes(data=data, origin=np.array(wr.origin), factor=np.array(wr.factor))
        atomic_write_bytes(self.folder / "pred" / f"{t.name}.npz", blob)
        atomic_write_bytes(self.folder / "work" / f"{t.name}.npz", blob)
        self.regions[t.name] = wr
        self._write_state()
        return wr

    def set_reviewed(self, tissue: "Tissue | str", reviewed: bool = True) -> None:
        t = get_tissue(tissue, self.tissues)
        if t.name not in self.regions:
            raise SessionError(f"{t.label} has no working region yet; segment a region first")
        self.regions[t.name].reviewed = bool(reviewed)
        self._write_state()

    def edited_pixels(self, tissue: "Tissue | str") -> int:
        """Pixels that differ from the model's prediction of the current region."""
        t = get_tissue(tissue, self.tissues)
        wr = self.regions[t.name]
        pred = _load_npz(self.folder / "pred" / f"{t.name}.npz")["data"]
        if pred.shape != wr.data.shape:
            return int(wr.data.size)
        return int(np.count_nonzero(pred != wr.data))

    def discard(self, tissue: "Tissue | str") -> WorkingRegion:
        """Put the prediction back into the working array (in place; the napari layer follows)."""
        t = get_tissue(tissue, self.tissues)
        wr = self.regions[t.name]
        pred = _load_npz(self.folder / "pred" / f"{t.name}.npz")["data"]
        wr.data[...] = pred
        wr.reviewed = False
        self.save(t.name)
        wr.baseline_checksum = wr.saved_checksum
        self._write_state()
        return wr

    # ------------------------------------------------------------------ autosave
    def save(self, names: "str | Iterable[str] | None" = None) -> list[str]:
        """Save working arrays that changed since their last save, now; returns their names."""
        if isinstance(names, str):
            names = [names]
        with self._lock:
            return self._save_locked(list(self.regions) if names is None else list(names))

    def _save_locked(self, names: list[str]) -> list[str]:
        saved = []
        for n in names:
            wr = self.regions[n]
            snap = np.array(wr.data, copy=True)  # napari may paint while we compress
            cs = checksum(snap)
            if cs == wr.saved_checksum:
                continue
            atomic_write_bytes(self.folder / "work" / f"{n}.npz",
                               _npz_bytes(data=snap, origin=np.array(wr.origin), factor=np.array(wr.factor)))
            wr.saved_checksum = cs
            wr.last_save = time.monotonic()
            self.saves += 1
            saved.append(n)
        if saved:
            self._write_state()
        return saved

    def poll(self, now: float | None = None) -> list[str]:
        """Autosave: save the arrays that changed, each at most once per ``autosave_interval``."""
        now = time.monotonic() if now is None else now
        due = [n for n, wr in self.regions.items() if now - wr.last_save >= self.autosave_interval and wr.changed()]
        return self.save(due) if due else []

    def pending(self) -> list[str]:
        """Tissues whose array differs from what is saved (autosave has not run yet)."""
        return [n for n, wr in self.regions.items() if wr.changed()]

    flush = save

    # ------------------------------------------------------------------ commit
    def commit(self, names: Iterable[str] | None = None, store=None) -> list[CommitRecord]:
        """Accept the working regions of ``names`` (default: every reviewed tissue).

        Each commit is saved as an immutable file and recorded; with a label store
        (``store`` or the project's ``store_path``) holding the tissue, the region is
        also written back into it (level 0, its pyramid and the complete map).
        """
        if names is None:  # reviewed tissues with something new to accept
            names = [n for n, r in self.regions.items() if r.reviewed and (r.has_uncommitted_edits()
                                                                          or not self._committed(n, r))]
        names = [get_tissue(n, self.tissues).name for n in names]
        missing = [n for n in names if n not in self.regions]
        if missing:
            raise SessionError(f"no working region for {', '.join(missing)}")
        if not names:
            return []
        self.save(names)
        if store is None and self.store_path and Path(self.store_path).exists():
            from ..labels.store import LabelStore

            store = LabelStore(self.store_path, mode="r+")
        out = []
        for n in names:
            wr = self.regions[n]
            cid = self._next_commit_id()
            rel = f"commits/{cid:04d}-{n}.npz"
            atomic_write_bytes(self.folder / rel, _npz_bytes(data=wr.data, origin=np.array(wr.origin),
                                                             factor=np.array(wr.factor)), overwrite=False)
            for c in self.commits:  # a newer commit of the same region replaces an unexported one
                if (c.tissue == n and not c.exported and not c.superseded and c.origin == wr.origin
                        and tuple(c.shape) == wr.data.shape):
                    c.superseded = True
            rec = CommitRecord(cid, n, rel, wr.origin, wr.factor, wr.mpp, tuple(wr.data.shape), wr.region,  # type: ignore[arg-type]
                               wr.model_version, wr.reviewed, _now())
            if store is not None and store.has(n):
                # chunks are read, changed and rewritten: one writer at a time across processes
                with process_lock(store.path):
                    write_region_to_store(store, wr.tissue, wr.data, wr.origin, self.tissues)
                rec.store_written = True
            self.commits.append(rec)
            wr.baseline_checksum = checksum(wr.data)
            out.append(rec)
        self._write_state()
        return out

    def _next_commit_id(self) -> int:
        """One past every recorded commit and every commit file on disk: a crash after a
        commit file was written but before session.json recorded it leaves a file that
        no record names; the next commit takes the next number instead of failing on it."""
        on_disk = []
        for f in (self.folder / "commits").glob("*.npz"):
            m = re.match(r"(\d+)-", f.name)
            if m:
                on_disk.append(int(m.group(1)))
        return 1 + max([c.id for c in self.commits] + on_disk, default=0)

    def _committed(self, name: str, wr: WorkingRegion) -> bool:
        """Whether this very region of ``name`` was committed already (and not replaced)."""
        return any(c.tissue == name and not c.superseded and tuple(c.origin) == tuple(wr.origin)
                   and tuple(c.shape) == wr.data.shape and c.reviewed for c in self.commits)

    def load_commit(self, rec: CommitRecord) -> np.ndarray:
        return _load_npz(self.folder / rec.file)["data"]

    def exportable(self) -> list[CommitRecord]:
        """Committed, reviewed, not yet exported and not replaced by a newer commit."""
        return [c for c in self.commits if c.reviewed and not c.exported and not c.superseded]

    def mark_exported(self, ids: Iterable[int], rows: dict[int, int] | None = None) -> None:
        ids = set(ids)
        for c in self.commits:
            if c.id in ids:
                c.exported = True
                c.export_rows = int((rows or {}).get(c.id, 0))
        self._write_state()


# --------------------------------------------------------------------------- label store
def write_region_to_store(store, tissue: Tissue, data: np.ndarray, origin: tuple[int, int],
                          tissues: Sequence[Tissue] = TISSUES) -> tuple[int, int, int, int]:
    """Write a tissue's region into a :class:`LabelStore` and refresh what depends on it.

    Level 0 of the tissue gets ``data`` at ``origin`` (clipped to the store); the
    coarser levels are rebuilt over the affected chunks (same stride-2 rule as the
    store) and so is the complete map.  Returns the written (y0, y1, x0, x1).
    """
    from ..labels.aggregate import complete_map
    from ..labels.store import MAP_NAME

    arr = store.level(tissue.name, 0)
    H, W = arr.shape
    y0, x0 = max(0, origin[0]), max(0, origin[1])
    y1, x1 = min(H, origin[0] + data.shape[0]), min(W, origin[1] + data.shape[1])
    if y0 >= y1 or x0 >= x1:
        raise SessionError(f"{tissue.name}: the region lies outside the label store")
    arr[y0:y1, x0:x1] = data[y0 - origin[0] : y1 - origin[0], x0 - origin[1] : x1 - origin[1]]
    _refresh_levels(store, tissue.name, (y0, y1, x0, x1))
    if store.has(MAP_NAME):
        names = [n for n in store.tissue_names if store.has(n)]
        ts = [get_tissue(n, tissues) for n in names]
        mmpp = store.mpp(MAP_NAME)
        dst = store.level(MAP_NAME, 0)
        r = tissue.mpp / mmpp  # map pixels per tissue pixel
        my0, mx0 = int(y0 * r), int(x0 * r)
        my1, mx1 = min(dst.shape[0], math.ceil(y1 * r)), min(dst.shape[1], math.ceil(x1 * r))
        masks = {}
        for t in ts:
            src = store.level(t.name, 0)
            rt = t.mpp / mmpp
            ys = np.minimum(((np.arange(my0, my1) + 0.5) / rt).astype(int), src.shape[0] - 1)
            xs = np.minimum(((np.arange(mx0, mx1) + 0.5) / rt).astype(int), src.shape[1] - 1)
            sub = np.asarray(src[ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1])
            masks[t.name] = sub[np.ix_(ys - ys[0], xs - xs[0])]
        dst[my0:my1, mx0:mx1] = complete_map(masks, ts)
        _refresh_levels(store, MAP_NAME, (my0, my1, mx0, mx1))
    return y0, y1, x0, x1


def _refresh_levels(store, name: str, box: tuple[int, int, int, int]) -> None:
    y0, y1, x0, x1 = box
    for k in range(1, store.n_levels(name)):
        src, dst = store.level(name, k - 1), store.level(name, k)
        # level k pixel i is level k-1 pixel 2i
        y0, x0 = y0 // 2, x0 // 2
        y1, x1 = min(dst.shape[0], (y1 + 1) // 2), min(dst.shape[1], (x1 + 1) // 2)
        if y0 >= y1 or x0 >= x1:
            return
        block = np.asarray(src[2 * y0 : 2 * y1, 2 * x0 : 2 * x1])
        dst[y0:y1, x0:x1] = block[::2, ::2][: y1 - y0, : x1 - x0]
