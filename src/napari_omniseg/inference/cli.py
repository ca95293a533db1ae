"""``omniseg segment`` and ``omniseg export``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cli import _Bar, _args, command


def _segment_args(p: argparse.ArgumentParser):
    p.add_argument("slides", nargs="+", metavar="SLIDE", help="slide file(s): SVS, OME-TIFF, tiled TIFF, OME-Zarr, PNG/JPEG (with --mpp), NDPI/MRXS (openslide extra)")
    p.add_argument("-o", "--out", required=True, help="output .ome.zarr (one slide) or a folder (several slides: <slide>.ome.zarr inside)")
    p.add_argument("--tissues", nargs="+", help="tissue names or short codes (default: all six)")
    p.add_argument("--region", nargs=4, type=int, metavar=("X", "Y", "W", "H"), help="level-0 region instead of the whole slide")
    p.add_argument("--checkpoint", "-c", help="checkpoint (.safetensors); default: the active model")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--batch-size", type=int, default=0, help="tiles per model call (0 = auto: 1 on CPU, 16 on CUDA)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 on GPUs and on CPUs with AMX/AVX-512 bf16, fp32 elsewhere (fp16: CUDA only)")
    p.add_argument("--tile", type=int, default=512, help="output block side in pixels (multiple of 16; default 512)")
    p.add_argument("--margin", type=int, default=32, help="context on each side of a block, blended with neighbours (default 32)")
    p.add_argument("--mpp", type=float, help="microns per pixel at level 0 (overrides the file; required when the file has none)")
    p.add_argument("--no-skip-background", action="store_true", help="run every tile, even where the tissue mask finds none")
    p.add_argument("--scheduler", help="dask.distributed scheduler address: run the slides on that cluster")
    p.add_argument("--parts", type=int, default=0,
                   help="with --scheduler: split each slide into this many bands of blocks run as separate tasks "
                        "(0 = auto: one slide is split over all worker threads, several slides run one task each)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--readers", type=int, default=0,
                   help="threads reading and resampling the slide (0 = auto: 1 on CPU, up to 4 on CUDA)")
    p.add_argument("--write-thread", choices=["auto", "on", "off"], default="auto",
                   help="write finished blocks in a thread beside the model (auto: on with CUDA, off on CPU)")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask before long runs")
    p.add_argument("--quiet", "-q", action="store_true")


def engine_config(a) -> "EngineConfig":
    from .engine import EngineConfig

    if a.tile % 16 or (a.tile + 2 * a.margin) % 16:
        raise SystemExit("error: --tile and --tile + 2 * --margin must be multiples of 16")
    if a.readers < 0:
        raise SystemExit(f"error: --readers must be 0 (auto) or more, got {a.readers}")
    return EngineConfig(core=a.tile, margin=a.margin, batch_size=a.batch_size, device=a.device,
                        precision=a.precision,
                        skip_background=not a.no_skip_background, threads=a.threads,
                        readers=a.readers, writers={"auto": -1, "on": 1, "off": 0}[a.write_thread])


_SLIDE_SUFFIXES = (".ome.tiff", ".ome.tif", ".ome.zarr", ".tiff", ".tif", ".svs", ".ndpi", ".mrxs", ".scn", ".zarr",
                   ".png", ".jpg", ".jpeg")


def slide_stem(path) -> str:
    """A slide's name without its format suffix (``case.a.ome.tif`` -> ``case.a``)."""
    name = Path(path).name
    for suf in _SLIDE_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)] or name
    return Path(name).stem or name


def _outputs(slides, out) -> list[Path]:
    """One output per slide; slides whose names still collide get their folder's name too."""
    if len(slides) == 1:
        return [Path(out)]
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    stems = [slide_stem(s) for s in slides]
    names = []
    for s, stem in zip(slides, stems):
        if stems.count(stem) > 1:
            stem = f"{Path(s).resolve().parent.name}-{stem}"
        names.append(stem)
    out, used = [], set()
    for n in names:  # still equal (same folder name too): number them
        cand, k = n, 1
        while cand in used:
            k += 1
            cand = f"{n}-{k}"
        used.add(cand)
        out.append(d / (cand + ".ome.zarr"))
    return out


def segment_one(slide: str, out: str, checkpoint: str | None, tissues, region, cfg_dict: dict, mpp: float | None,
                on_progress=None) -> dict:
    """Segment one slide into ``out``; importable by dask workers."""
    from .distributed import _relax_malloc_trim

    _relax_malloc_trim()  # a no-op cost locally; on a dask worker it undoes the nanny's trim setting
    from ..model import load_checkpoint, resolve_checkpoint
    from ..slides import open_slide
    from .engine import EngineConfig, Segmenter
    from .run import segment_to_store

    ck = load_checkpoint(resolve_checkpoint(checkpoint))
    seg = Segmenter(ck, EngineConfig(**cfg_dict))
    with open_slide(slide, mpp=mpp) as src:
        store, rep = segment_to_store(seg, src, out, tissues, region, on_progress=on_progress)
    return {"slide": slide, "out": out, "tiles_run": rep.tiles_run, "tiles_skipped": rep.tiles_skipped,
            "tiles_failed": len(rep.tiles_failed), "blocks_resumed": rep.blocks_resumed, "seconds": round(rep.seconds, 1)}


@command("segment")
@_args(_segment_args)
def cmd_segment(a: argparse.Namespace) -> int:
    """Segment slides into OME-Zarr label stores (one multiscale label image per tissue + a complete map).

    Each tissue is read at its own magnification; tissues at the same magnification
    share one backbone pass per tile.  Rerunning an interrupted command resumes it.
    """
    from dataclasses import asdict

    cfg = engine_config(a)
    outs = _outputs(a.slides, a.out)
    if a.scheduler:
        from distributed import Client

        with Client(a.scheduler) as client:
            parts = a.parts or (max(1, sum(client.nthreads().values())) if len(a.slides) == 1 else 1)
            if parts > 1:  # the blocks of each slide spread over the cluster
                from .distributed import segment_on_cluster

                for s, o in zip(a.slides, outs):
                    r = segment_on_cluster(client, s, str(o), a.checkpoint, a.tissues, a.region, asdict(cfg), a.mpp,
                                           parts=parts)
                    r.pop("reports", None)
                    print(json.dumps(r))
                return 0
            futs = [client.submit(segment_one, s, str(o), a.checkpoint, a.tissues, a.region, asdict(cfg), a.mpp,
                                  pure=False, key=f"omniseg-{Path(o).name}")  # one task per output
                    for s, o in zip(a.slides, outs)]
            for f in futs:
                r = f.result()
                print(json.dumps(r))
        return 0

    from ..model import load_checkpoint, resolve_checkpoint
    from ..slides import open_slide
    from .engine import Segmenter
    from .run import estimate, segment_to_store

    ck = load_checkpoint(resolve_checkpoint(a.checkpoint))
    seg = Segmenter(ck, cfg)
    for slide, out in zip(a.slides, outs):
        with open_slide(slide, mpp=a.mpp) as src:
            region = tuple(a.region) if a.region else None
            est = estimate(seg, src, a.tissues, region)
            mins = est["seconds"] / 60
            print(f"{slide}: {src.shapes[0][1]} x {src.shapes[0][0]} px at {src.mpp:.3f} um/px; "
                  f"{est['tiles']} tiles to run ({est['tiles_background']} background skipped), "
                  f"estimated {mins:.1f} min on {seg.device}", file=sys.stderr)
            if mins > 10 and not a.yes and sys.stdin.isatty():
                if input("continue? [y/N] ").strip().lower() not in ("y", "yes"):
                    return 1
            bar = _Bar(max(est["tiles"] + est["tiles_background"], 1), "segment", a.quiet)
            state = {"n": 0}

            def prog(ev):
                bar.update(ev["done"] - state["n"], mag=f"{ev['magnification']}x")
                state["n"] = ev["done"]

            store, rep = segment_to_store(seg, src, out, a.tissues, region, on_progress=prog)
            bar.close()
            print(f"wrote {out}: {rep.tiles_run} tiles run, {rep.tiles_skipped} background, "
                  f"{len(rep.tiles_failed)} with unreadable parts (marked unknown), {rep.blocks_resumed} blocks resumed, "
                  f"{rep.seconds:.1f} s", file=sys.stderr)
            for m, ti, tj, err in rep.tiles_failed:
                print(f"  tile at {m}x ({ti}, {tj}): {err}", file=sys.stderr)
    return 0


def _export_args(p: argparse.ArgumentParser):
    p.add_argument("store", metavar="SLIDE_OUTPUT", help="a .ome.zarr written by `omniseg segment`")
    p.add_argument("--geojson", help="write QuPath GeoJSON here (polygons in level-0 pixels)")
    p.add_argument("--measurements", help="write per-tissue measurements CSV here")
    p.add_argument("--tissues", nargs="+")


@command("export")
@_args(_export_args)
def cmd_export(a: argparse.Namespace) -> int:
    """Export a segmentation as QuPath GeoJSON and/or a measurements CSV."""
    from ..labels.export import write_geojson, write_measurements_csv
    from ..labels.store import LabelStore

    if not (a.geojson or a.measurements):
        print("error: give --geojson and/or --measurements", file=sys.stderr)
        return 2
    if not Path(a.store).exists():
        print(f"error: {a.store} does not exist", file=sys.stderr)
        return 2
    store = LabelStore(a.store)
    if not store.complete:
        print(f"error: {a.store} is incomplete; rerun `omniseg segment` to finish it", file=sys.stderr)
        return 2
    if a.geojson:
        write_geojson(store, a.geojson, tissues=a.tissues)
        print(f"wrote {a.geojson}", file=sys.stderr)
    if a.measurements:
        write_measurements_csv(store, a.measurements, tissues=a.tissues)
        print(f"wrote {a.measurements}", file=sys.stderr)
    return 0


def _suggest_args(p: argparse.ArgumentParser):
    p.add_argument("store", metavar="SLIDE_OUTPUT", help="a .ome.zarr written by `omniseg segment`")
    p.add_argument("--tissues", nargs="+", help="rank only these tissues (default: every tissue in the store)")
    p.add_argument("-n", type=int, default=20, help="how many regions (default 20)")
    p.add_argument("--spread", type=float, default=2.0,
                   help="skip a block within this many block widths of one already suggested (default 2)")
    p.add_argument("--by-score", action="store_true",
                   help="rank by score alone (default: the tissues take turns, each one's best block first)")
    p.add_argument("--project", help="a correction project folder: regions committed there leave the queue")
    p.add_argument("--geojson", help="also write the regions as QuPath GeoJSON annotations here")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


@command("suggest")
@_args(_suggest_args)
def cmd_suggest(a: argparse.Namespace) -> int:
    """Rank the regions of a segmentation to review first (most uncertain, spread out)."""
    import json

    from .._io import atomic_write_bytes
    from ..labels.review import suggest, suggestions_geojson
    from ..labels.store import LabelStore

    if a.n < 1:
        print("error: -n must be at least 1", file=sys.stderr)
        return 2
    store = LabelStore(a.store)
    reviewed = []
    if a.project:
        from ..corrections.session import committed_regions

        reviewed = committed_regions(a.project)
    if "review" not in store.root:
        print(f"error: {a.store} holds no review scores (it was written by an earlier version); "
              "segment the slide again into a new folder", file=sys.stderr)
        return 2
    sugs = suggest(store, a.tissues, a.n, reviewed=reviewed, spread=a.spread, balance=not a.by_score)
    if a.geojson:
        atomic_write_bytes(Path(a.geojson), json.dumps(suggestions_geojson(sugs)).encode())
        print(f"wrote {a.geojson}", file=sys.stderr)
    if a.json:
        print(json.dumps([s.to_json() for s in sugs], indent=1))
        return 0
    print(f"{'rank':>4}  {'tissue':<22} {'x':>7} {'y':>7} {'w':>5} {'h':>5}  {'score':>5}  {'entropy':>7}  {'violation':>9}")
    for s in sugs:
        print(f"{s.rank:>4}  {s.tissue:<22} {s.x:>7} {s.y:>7} {s.w:>5} {s.h:>5}  {s.score:>5.2f}  {s.entropy:>7.3f}  "
              f"{s.violation:>9.3f}")
    if not sugs:
        print("(nothing left to review)", file=sys.stderr)
    return 0
