"""Whole-slide (or region) segmentation into an OME-Zarr label store.

``segment_to_store`` is what ``omniseg segment`` and the dask path call: it opens or
resumes the store, runs the engine over the slide, then builds the pyramid levels
and the complete label map.  ``estimate`` counts the tiles a run needs (after
skipping background) and times one real batch, so the user sees the expected run
time before committing to it.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import __version__
from ..labels.store import LabelStore
from .engine import EngineConfig, RunReport, Segmenter, read_tile


def estimate(segmenter: Segmenter, source, tissues=None, region=None, sample_batches: int = 1) -> dict:
    """Tiles to run per magnification and an estimated time from one timed batch each."""
    plans = segmenter.plans(source, tissues, region)
    mask = segmenter.tissue_mask(source, region) if segmenter.cfg.skip_background else None
    out = {"tiles": 0, "tiles_background": 0, "seconds": 0.0, "per_magnification": {}}
    for p in plans:
        run = [t for t in p.tiles if mask is None or segmenter._has_tissue(mask, p, t, source.mpp)]
        n_bg = len(p.tiles) - len(run)
        spt = 0.0
        unreadable = 0
        batch = None
        if run:
            bs = min(segmenter.batch_size, len(run))
            # tiles spread over the run; an unreadable one is skipped for the next (it is
            # the run's business to mark it unknown, not the estimate's to fail on it)
            picks, tried = [], 0
            order = [run[i * len(run) // bs] for i in range(bs)] + [t for t in run[::max(1, len(run) // 64)]]
            for t in order:
                if len(picks) == bs or tried >= 4 * bs + 8:
                    break
                tried += 1
                try:
                    picks.append(read_tile(source, p, *t))
                except Exception:  # noqa: BLE001
                    unreadable += 1
            batch = np.stack(picks) if picks else None
        if batch is not None:
            bs = len(batch)
            segmenter.predict_tiles(batch[:1], [t.id for t in p.tissues])  # warm-up
            t0 = time.perf_counter()
            for _ in range(sample_batches):
                segmenter.predict_tiles(batch, [t.id for t in p.tissues])
            spt = (time.perf_counter() - t0) / (sample_batches * bs)
        out["per_magnification"][p.magnification] = {"tiles": len(run), "background": n_bg, "seconds_per_tile": spt,
                                                     "tile_px": p.tile_size, "unreadable_sampled": unreadable}
        out["tiles"] += len(run)
        out["tiles_background"] += n_bg
        out["seconds"] += spt * len(run)
    return out


def segment_to_store(
    segmenter: Segmenter,
    source,
    out: "str | Path",
    tissues=None,
    region: Sequence[int] | None = None,
    on_progress=None,
    should_stop=None,
) -> tuple[LabelStore, RunReport]:
    """Segment into ``out`` (created, or resumed if it holds the same job)."""
    ts = segmenter.tissues(tissues)
    region = tuple(region) if region else None
    store = create_store(segmenter, source, out, ts, region)
    rep = segmenter.run(source, store, [t.name for t in ts], region, on_progress, should_stop)
    finish_store(segmenter, source, store, ts, region, rep)
    return store, rep


def create_store(segmenter: Segmenter, source, out, ts, region=None) -> LabelStore:
    """The label store of this job: created, or reopened to resume when it holds the same."""
    attrs = {
        "source": str(getattr(source, "path", "")),
        "model_version": segmenter.ckpt.version,
        "model_sha256": segmenter.ckpt.sha256,
        "napari_omniseg_version": __version__,
        "region": list(region) if region else None,
        "tissue_colors": {t.name: t.color for t in ts},
        "engine": asdict(segmenter.cfg),
    }
    return LabelStore.create(out, ts, tuple(source.shapes[0]), float(source.mpp), segmenter.cfg.core, attrs)


def finish_store(segmenter: Segmenter, source, store: LabelStore, ts, region, rep: RunReport) -> None:
    """Coarser levels, the complete map and the run's record; the store is then complete."""
    info = {"tiles_run": rep.tiles_run, "tiles_skipped": rep.tiles_skipped, "tiles_failed": len(rep.tiles_failed),
            "failed": [list(f) for f in rep.tiles_failed], "seconds": round(rep.seconds, 2),
            "precision": segmenter.precision, "batch_size": segmenter.batch_size}
    if segmenter.cfg.skip_background:
        m, m_mpp = segmenter.tissue_mask(source, region)
        area = float(m.sum()) * (m_mpp / 1000.0) ** 2
        if area > 0:  # no tissue found: densities fall back to the slide area
            info["tissue_area_mm2"] = area
    store.finalize(ts, run_info=info, box=region)
    om = store.meta
    if "tissue_area_mm2" in info:
        om["tissue_area_mm2"] = info["tissue_area_mm2"]
        store.root.attrs["omniseg"] = om
