"""One slide spread over a dask.distributed cluster.

The client creates the label store (and its review-score arrays), splits every
magnification's blocks into bands of whole block rows, and submits one task per
band; dask's scheduler places them and, when a worker dies, runs its task again
elsewhere.  Each task opens the slide and the store itself and writes only its own
blocks (a level-0 chunk is one block; a score chunk is one row of blocks) and its
own ``progress-<part>.json``, so a task run again resumes where the dead one stopped.
A band also reads the row of tiles on each side of it (blending needs a block's 3x3
neighbouring tiles), so every block's pixels are bit-identical to a local run's.
When all bands are done, the client builds the coarser levels and the complete map.
"""

from __future__ import annotations

from pathlib import Path


def band_of(plan, part: int, parts: int) -> set:
    """The blocks of ``plan`` that part ``part`` of ``parts`` produces: whole block rows."""
    rows = sorted({b[0] for b in plan.blocks})
    mine = {r for k, r in enumerate(rows) if k * parts // max(len(rows), 1) == part}
    return {b for b in plan.blocks if b[0] in mine}


def _report(rep) -> dict:
    return {"tiles_run": rep.tiles_run, "tiles_skipped": rep.tiles_skipped, "tiles_failed": [list(f) for f in rep.tiles_failed],
            "blocks_written": rep.blocks_written, "blocks_resumed": rep.blocks_resumed, "seconds": rep.seconds,
            "model_seconds": rep.model_seconds, "read_seconds": rep.read_seconds}


def _relax_malloc_trim() -> None:
    """Undo dask's ``MALLOC_TRIM_THRESHOLD_=65536`` for this worker process.

    dask's nanny starts workers with glibc told to return freed memory to the system
    above 64 KiB; the model's activations are freed and allocated again for every tile,
    so each tile then pays for fresh pages: measured 2.3x slower model time per band on
    a 2-worker LocalCluster (105 s against 46 s).  Raising the trim and mmap thresholds
    at run time (glibc ``mallopt``) brings it back (41 s).  No-op where there is no glibc."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD (glibc caps it at its maximum)
    except (OSError, AttributeError):
        pass


def segment_part(slide: str, out: str, checkpoint, tissues, region, cfg_dict: dict, mpp, part: int, parts: int) -> dict:
    """Run one band of a slide into an existing store (a task on a dask worker)."""
    _relax_malloc_trim()
    from ..labels.store import LabelStore
    from ..model import load_checkpoint, resolve_checkpoint
    from ..slides import open_slide
    from .engine import EngineConfig, Segmenter

    seg = Segmenter(load_checkpoint(resolve_checkpoint(checkpoint)), EngineConfig(**cfg_dict))
    store = LabelStore(out, mode="r+", part=str(part))
    with open_slide(slide, mpp=mpp) as src:
        rep = seg.run(src, store, tissues, tuple(region) if region else None,
                      blocks=lambda plan: band_of(plan, part, parts))
    return {"part": part, "precision": seg.precision, "batch_size": seg.batch_size, **_report(rep)}


def segment_on_cluster(client, slide: str, out: str, checkpoint, tissues, region, cfg_dict: dict, mpp,
                       parts: int | None = None, on_part=None) -> dict:
    """Segment one slide with its bands spread over ``client``'s workers; returns the
    merged report. ``parts`` defaults to the number of worker threads."""
    from ..model import load_checkpoint, resolve_checkpoint
    from ..slides import open_slide
    from .engine import EngineConfig, RunReport, Segmenter
    from .run import create_store, finish_store

    parts = int(parts or max(1, sum(client.nthreads().values())))
    seg = Segmenter(load_checkpoint(resolve_checkpoint(checkpoint)), EngineConfig(**cfg_dict))
    reg = tuple(region) if region else None
    with open_slide(slide, mpp=mpp) as src:
        ts = seg.tissues(tissues)
        store = create_store(seg, src, out, ts, reg)
        store.prepare_scores(seg.plans(src, [t.name for t in ts], reg))
        names = [t.name for t in ts]
        futs = [client.submit(segment_part, str(slide), str(out), checkpoint, names, reg, cfg_dict, mpp, k, parts,
                              pure=False, key=f"omniseg-{Path(out).name}-part{k}-of-{parts}")
                for k in range(parts)]
        reports = []
        for f in futs:
            r = f.result()
            reports.append(r)
            if on_part is not None:
                on_part(r)
        rep = RunReport()
        for r in reports:
            rep.tiles_run += r["tiles_run"]
            rep.tiles_skipped += r["tiles_skipped"]
            rep.tiles_failed += [tuple(x) for x in r["tiles_failed"]]
            rep.blocks_written += r["blocks_written"]
            rep.blocks_resumed += r["blocks_resumed"]
            rep.seconds = max(rep.seconds, r["seconds"])
        seg.precision, seg.batch_size = reports[0]["precision"], reports[0]["batch_size"]  # what the workers used
        finish_store(seg, src, store, ts, reg, rep)
    return {"slide": str(slide), "out": str(out), "parts": parts, "tiles_run": rep.tiles_run,
            "tiles_skipped": rep.tiles_skipped, "tiles_failed": len(rep.tiles_failed),
            "blocks_resumed": rep.blocks_resumed, "reports": reports}
