"""Committed, reviewed corrections -> training patches (Qt-free).

Each exportable commit (see :meth:`CorrectionSession.exportable`) is cut into a grid
of ``patch`` x ``patch`` tiles on its tissue's own pixel grid (so every patch is at
that tissue's magnification).  The last row and column are shifted inward to end at
the region's edge; a region smaller than ``patch`` gives one smaller patch.  Tiles
holding *unknown* pixels (255: unreadable slide data) are skipped, since a binary
mask cannot say "unknown".

For each tile an RGB PNG is read from the slide with ``source.read_at_mpp`` and a
0/255 single-channel PNG mask is written beside it, in the Omni-Seg folder layout
(``<task>_<scale>_<short>/<stain or "corrections">/``), so the folder loads through
``manifest.csv`` and through the Omni-Seg layout alike.  Rows are appended to
``manifest.csv`` atomically, after the images exist.  Files are never overwritten: a
name that exists gets a numeric suffix.  A tile whose ``name`` is already in the
manifest is not written again, so repeating an interrupted export is harmless.

About 20 % of each tissue's patches (at least one when there are two or more) are
held out as ``split = "val"``, chosen deterministically from a hash of slide,
tissue and position, so the same correction always lands in the same split.
"""

from __future__ import annotations

import hashlib
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .._io import atomic_write_bytes, process_lock
from ..training.manifest import append_manifest_rows, read_manifest_rows, relpath
from .session import UNKNOWN, CommitRecord, CorrectionSession, safe_name, slide_stem

ProgressFn = Callable[[dict], None]


@dataclass
class ExportResult:
    out_dir: Path
    manifest: Path
    per_tissue: dict[str, int] = field(default_factory=dict)  #: patches written per tissue
    val_per_tissue: dict[str, int] = field(default_factory=dict)
    skipped_unknown: int = 0
    skipped_existing: int = 0
    cleaned_orphans: int = 0  #: files of an interrupted earlier export removed first
    commits: list[int] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)

    @property
    def n_patches(self) -> int:
        return sum(self.per_tissue.values())


def patch_grid(n: int, patch: int) -> list[int]:
    """Start offsets of tiles of size min(patch, n) covering 0..n (last one flush with the end)."""
    p = min(patch, n)
    starts = list(range(0, n - p + 1, p))
    if starts[-1] + p < n:
        starts.append(n - p)
    return starts


def _png_bytes(a: np.ndarray) -> bytes:
    import imageio.v3 as iio

    buf = io.BytesIO()
    iio.imwrite(buf, a, extension=".png")
    return buf.getvalue()


def _pick_level(source, mpp: float) -> int:
    """The pyramid level a reader would use: the coarsest one not coarser than ``mpp``."""
    ds = list(getattr(source, "downsamples", [1.0]) or [1.0])
    f = mpp / float(source.mpp)
    best = 0
    for k, d in enumerate(ds):
        if d <= f * (1 + 1e-6):
            best = k
    return best


def _as_rgb(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.shape[2] == 4:
        img = img[..., :3]
    if img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(img)


def _held_out(keys: list[str], fraction: float) -> set[str]:
    if len(keys) < 2 or fraction <= 0:
        return set()
    n = max(1, int(round(fraction * len(keys))))
    ranked = sorted(keys, key=lambda k: hashlib.sha1(k.encode()).hexdigest())
    return set(ranked[:n])


JOURNAL = ".export-journal.json"


def recover_interrupted_export(out_dir: "str | Path") -> int:
    """Delete what an interrupted export wrote but never recorded; returns files removed."""
    import json

    out_dir = Path(out_dir)
    journal = out_dir / JOURNAL
    if not journal.exists():
        return 0
    try:
        paths = [str(x) for x in json.loads(journal.read_text()).get("files", [])]
    except (ValueError, AttributeError, UnicodeDecodeError):
        paths = []
    recorded = set()
    for r in read_manifest_rows(out_dir / "manifest.csv"):
        recorded.add(r.get("image_path", ""))
        recorded.add(r.get("label_path", ""))
    removed = 0
    for rel in paths:
        f = (out_dir / rel).resolve()
        if out_dir.resolve() not in f.parents or rel in recorded:
            continue  # only our own unrecorded files inside the folder
        try:
            f.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    journal.unlink()
    return removed


def _same_patch(out_dir: Path, row: dict, slide_name: str, mask: np.ndarray) -> bool:
    """Whether an existing manifest row is this very patch (same slide, same mask pixels)."""
    if row.get("source_slide", "") != slide_name:
        return False
    try:
        import imageio.v3 as iio

        old = np.asarray(iio.imread(out_dir / row["label_path"]))
    except (OSError, KeyError, ValueError):
        return False
    if old.ndim == 3:
        old = old[..., 0]
    return old.shape == mask.shape and np.array_equal(old > 127, mask == 1)


def export_corrections(
    session: CorrectionSession,
    source,
    out_dir: "str | Path | None" = None,
    *,
    patch: int = 256,
    val_fraction: float = 0.2,
    stain: str = "",
    source_slide: str | None = None,
    commits: list[CommitRecord] | None = None,
    on_progress: ProgressFn | None = None,
) -> ExportResult:
    """Write the exportable commits of ``session`` as training patches; returns counts per tissue."""
    out_dir = Path(out_dir) if out_dir is not None else session.training_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    with process_lock(out_dir / JOURNAL):  # one export into a folder at a time, across processes
        return _export_locked(session, source, out_dir, patch=patch, val_fraction=val_fraction, stain=stain,
                              source_slide=source_slide, commits=commits, on_progress=on_progress)


def _export_locked(session, source, out_dir: Path, *, patch, val_fraction, stain, source_slide, commits,
                   on_progress) -> ExportResult:
    import json

    manifest = out_dir / "manifest.csv"
    res = ExportResult(out_dir, manifest)
    res.cleaned_orphans = recover_interrupted_export(out_dir)
    todo = session.exportable() if commits is None else commits
    if not todo:
        return res
    slide_name = source_slide or session.slide.path or session.slide.id
    tag = hashlib.sha1(str(slide_name).encode()).hexdigest()[:6]
    stem = f"{safe_name(slide_stem(slide_name))}-{tag}"
    known = {r.get("name", ""): r for r in read_manifest_rows(manifest)}
    ts = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    stain_dir = safe_name(stain) if stain else "corrections"
    H0, W0 = session.slide.level0_shape

    # plan every tile first (so the val hold-out is chosen per tissue over the whole export)
    plans: list[tuple[CommitRecord, np.ndarray, int, int, str, str]] = []
    for rec in todo:
        data = session.load_commit(rec)
        t = next(t for t in session.tissues if t.name == rec.tissue)
        # keep only pixels that lie on the slide
        f = rec.factor
        hmax = min(data.shape[0], int(math.floor(H0 / f)) - rec.origin[0])
        wmax = min(data.shape[1], int(math.floor(W0 / f)) - rec.origin[1])
        if hmax <= 0 or wmax <= 0:
            continue
        data = data[:hmax, :wmax]
        for ty in patch_grid(data.shape[0], patch):
            for tx in patch_grid(data.shape[1], patch):
                ph, pw = min(patch, data.shape[0]), min(patch, data.shape[1])
                m = data[ty : ty + ph, tx : tx + pw]
                if (m == UNKNOWN).any():
                    res.skipped_unknown += 1
                    continue
                y0 = int(round((rec.origin[0] + ty) * f))
                x0 = int(round((rec.origin[1] + tx) * f))
                name = f"{stem}-{t.short}-c{rec.id}-x{x0}-y{y0}-{pw}x{ph}"
                if name in known:
                    if _same_patch(out_dir, known[name], slide_name, m):
                        res.skipped_existing += 1
                        continue
                    k = 1
                    while f"{name}-{k}" in known:
                        k += 1
                    name = f"{name}-{k}"  # same name, other pixels: a new patch, never dropped
                plans.append((rec, m, y0, x0, name, f"{slide_name}|{t.name}|{x0}|{y0}|{pw}x{ph}"))
    val: set[str] = set()
    by_tissue: dict[str, list[str]] = {}
    for rec, _m, _y0, _x0, _name, key in plans:
        by_tissue.setdefault(rec.tissue, []).append(key)
    for keys in by_tissue.values():
        val |= _held_out(keys, val_fraction)

    # the files this export will write, named before any is written (see recover_interrupted_export)
    targets = []
    taken: set[Path] = set()
    for rec, m, y0, x0, name, key in plans:
        t = next(t for t in session.tissues if t.name == rec.tissue)
        folder = out_dir / f"{t.id}_{t.scale_id}_{t.short}" / stain_dir
        ip, i = folder / f"{name}.png", 0
        while ip in taken or ip.exists() or ip.with_name(f"{ip.stem}_mask_{t.short}.png").exists():
            i += 1
            ip = folder / f"{name}-{i}.png"
        lp = ip.with_name(f"{ip.stem}_mask_{t.short}.png")
        taken |= {ip, lp}
        targets.append((ip, lp))
    if plans:
        atomic_write_bytes(out_dir / JOURNAL, json.dumps({"files": [relpath(f, out_dir) for pair in targets
                                                                    for f in pair]}).encode())

    rows_by_commit: dict[int, int] = {}
    for i, ((rec, m, y0, x0, name, key), (ip, lp)) in enumerate(zip(plans, targets)):
        t = next(t for t in session.tissues if t.name == rec.tissue)
        ph, pw = m.shape
        img = _as_rgb(source.read_at_mpp(t.mpp, y0, x0, ph, pw))
        if img.shape[:2] != (ph, pw):
            raise ValueError(f"{slide_name}: reader returned {img.shape[:2]} for a {ph} x {pw} patch at x={x0} y={y0}")
        atomic_write_bytes(ip, _png_bytes(img), overwrite=False)
        atomic_write_bytes(lp, _png_bytes(np.where(m == 1, 255, 0).astype(np.uint8)), overwrite=False)
        split = "val" if key in val else "train"
        res.rows.append({
            "image_path": relpath(ip, out_dir),
            "label_path": relpath(lp, out_dir),
            "name": name,
            "task_id": t.id,
            "scale_id": t.scale_id,
            "tissue": t.name,
            "mpp": t.mpp,
            "source_slide": slide_name,
            "level": _pick_level(source, t.mpp),
            "x": x0,
            "y": y0,
            "stain": stain,
            "origin": "correction",
            "timestamp": ts,
            "model_version": rec.model_version,
            "split": split,
        })
        res.per_tissue[t.name] = res.per_tissue.get(t.name, 0) + 1
        if split == "val":
            res.val_per_tissue[t.name] = res.val_per_tissue.get(t.name, 0) + 1
        rows_by_commit[rec.id] = rows_by_commit.get(rec.id, 0) + 1
        if on_progress:
            on_progress({"phase": "export", "done": i + 1, "total": len(plans), "tissue": t.name})
    if res.rows:
        append_manifest_rows(manifest, res.rows)
    res.commits = [c.id for c in todo]
    session.mark_exported(res.commits, rows_by_commit)
    (out_dir / JOURNAL).unlink(missing_ok=True)
    return res
