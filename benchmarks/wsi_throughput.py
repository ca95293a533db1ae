"""Whole-slide throughput, shared-backbone speed-up, reference-plan speed-up, memory.

Builds pyramidal OME-TIFF slides at 40x (0.25 um/px) from the real renal demo
patches (each 10x patch upsampled 4x into a 1024 px cell; one cell in five left
white as background), then measures in one run:

(a) pipeline efficiency: end-to-end tiles/s of ``segment_to_store`` (reading,
    decoding, resampling, model, blending, zarr writes) divided by the bare model's
    tiles/s on the same tiles already in memory;
(b) shared backbone: one run of the five 5x/10x tissues versus five runs of one
    tissue each, same region, end to end;
(c) reference-style plan: 512 px windows at stride 64, one full network run per
    tissue per window, versus our plan, on the same small region (the reference
    time is the measured seconds per window forward times the exact number of
    window forwards that plan needs);
(d) peak RSS of a whole-slide run (5x tissues) for the slide and for one 4x larger,
    each in a fresh process.

    python benchmarks/wsi_throughput.py --size 20480 --workdir /tmp/wsi --report docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

DEMO = Path(__file__).resolve().parents[2] / "shared/data/renal-demo"
CELL = 1024  # a 256 px 10x patch at 40x


def demo_patches(data: Path) -> list[np.ndarray]:
    from napari_omniseg.training.data import load_dataset, read_image

    return [read_image(s.image_path) for s in load_dataset(data) if s.tissue.magnification == 10]


def _cell(patches, ci, cj):
    """Which patch fills cell (ci, cj); None = white background (one cell in five)."""
    k = (ci * 7919 + cj * 104729) % (len(patches) + len(patches) // 4)
    return None if k >= len(patches) else patches[k]


def _at_level(p: np.ndarray, k: int) -> np.ndarray:
    """A 10x patch as it appears at pyramid level k of a 40x slide (cell side 1024 / 2**k)."""
    s = 4 / 2**k
    if s >= 1:
        r = int(s)
        return np.repeat(np.repeat(p, r, axis=0), r, axis=1)
    r = int(round(1 / s))
    return p.reshape(256 // r, r, 256 // r, r, 3).mean(axis=(1, 3)).round().astype(np.uint8)


def build_slide(path: Path, size: int, patches, tile: int = 512, levels: int = 5, cell=None,
                background=(255, 255, 255)) -> Path:
    """Write a size x size 40x pyramid (JPEG tiles) without holding it in memory.

    ``cell(patches, ci, cj)`` says which patch fills a cell (None: background, drawn in
    the ``background`` colour); the default leaves one cell in five white."""
    if path.exists():
        return path
    n = size // CELL
    cache: dict = {}

    def cell_pixels(ci, cj, k):
        p = (cell or _cell)(patches, ci, cj)
        if p is None:
            return None
        key = (id(p), k)
        if key not in cache:
            cache[key] = _at_level(p, k)
        return cache[key]

    def level_tiles(k):
        cell = CELL // 2**k
        H = W = size // 2**k
        for y in range(0, H, tile):
            for x in range(0, W, tile):
                out = np.empty((tile, tile, 3), np.uint8)
                out[:] = background
                for ci in range(y // cell, min(n, -(-(y + tile) // cell))):
                    for cj in range(x // cell, min(n, -(-(x + tile) // cell))):
                        c = cell_pixels(ci, cj, k)
                        if c is None:
                            continue
                        cy0, cx0 = ci * cell, cj * cell
                        ty0, ty1 = max(y, cy0), min(y + tile, cy0 + cell)
                        tx0, tx1 = max(x, cx0), min(x + tile, cx0 + cell)
                        out[ty0 - y : ty1 - y, tx0 - x : tx1 - x] = c[ty0 - cy0 : ty1 - cy0, tx0 - cx0 : tx1 - cx0]
                yield out

    tmp = path.with_suffix(".tmp.tif")
    meta = {"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25, "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"}
    opts = dict(tile=(tile, tile), compression="jpeg", compressionargs={"level": 90}, photometric="rgb")
    with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tw:
        tw.write(level_tiles(0), shape=(size, size, 3), dtype=np.uint8, subifds=levels - 1, metadata=meta, **opts)
        for k in range(1, levels):
            tw.write(level_tiles(k), shape=(size // 2**k, size // 2**k, 3), dtype=np.uint8, subfiletype=1, **opts)
    tmp.rename(path)
    return path


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), {dev}"


def load_model(checkpoint):
    from napari_omniseg.model import load_checkpoint, new_checkpoint, resolve_checkpoint

    try:
        return load_checkpoint(resolve_checkpoint(checkpoint))
    except Exception:
        return new_checkpoint(seed=0)  # speed does not depend on the weights


def bench_efficiency(ck, slide, region, device, batch):
    """(a) end-to-end vs bare model on the same 10x tiles."""
    from napari_omniseg.inference.engine import EngineConfig, Segmenter, read_tile
    from napari_omniseg.inference.run import segment_to_store
    from napari_omniseg.slides import open_slide

    tissues = ["distal_tubule", "proximal_tubule", "artery"]
    seg = Segmenter(ck, EngineConfig(device=device, batch_size=batch, skip_background=False))
    with open_slide(slide) as src:
        plan = seg.plans(src, tissues, region)[0]
        out = Path(slide).with_suffix(f".eff-{time.time_ns()}.ome.zarr")
        t0 = time.perf_counter()
        _, rep = segment_to_store(seg, src, out, tissues, region)
        e2e = time.perf_counter() - t0
        tiles = np.stack([read_tile(src, plan, *t) for t in plan.tiles])
    ids = [0, 1, 4]
    seg.predict_tiles(tiles[:batch], ids)  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(tiles), batch):
        chunk = tiles[i : i + batch]
        if len(chunk) < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - len(chunk), *chunk.shape[1:]), chunk.dtype)])
        seg.predict_tiles(chunk, ids)
    bare = time.perf_counter() - t0
    return {"tiles": rep.tiles_run, "e2e_s": e2e, "bare_s": bare, "e2e_tiles_per_s": rep.tiles_run / e2e,
            "bare_tiles_per_s": len(tiles) / bare, "efficiency": (rep.tiles_run / e2e) / (len(tiles) / bare),
            "tile_px": plan.tile_size}


def bench_shared(ck, slide, region, device, batch):
    """(b) five 5x/10x tissues in one run vs five single-tissue runs."""
    from napari_omniseg.inference.engine import EngineConfig, Segmenter, segment_region
    from napari_omniseg.slides import open_slide

    five = ["distal_tubule", "proximal_tubule", "glomerular_unit", "glomerular_tuft", "artery"]
    seg = Segmenter(ck, EngineConfig(device=device, batch_size=batch, skip_background=False))
    with open_slide(slide) as src:
        segment_region(seg, src, (0, 0, 1024, 1024), ["glomerular_unit"])  # warm-up
        t0 = time.perf_counter()
        shared, _ = segment_region(seg, src, region, five)
        t_shared = time.perf_counter() - t0
        t0 = time.perf_counter()
        single = {}
        for name in five:
            r, _ = segment_region(seg, src, region, [name])
            single[name] = r[name]
        t_single = time.perf_counter() - t0
    same = all(np.array_equal(shared[n].data, single[n].data) for n in five)
    return {"shared_s": t_shared, "per_tissue_s": t_single, "speedup": t_single / t_shared, "identical": same}


def bench_reference(ck, slide, region, device, batch):
    """(c) reference plan (512 windows, stride 64, one run per tissue per window) vs ours."""
    from napari_omniseg.inference.engine import EngineConfig, Segmenter, segment_region
    from napari_omniseg.slides import open_slide
    from napari_omniseg.tissues import TISSUES

    seg = Segmenter(ck, EngineConfig(device=device, batch_size=batch, skip_background=False))
    x, y, w, h = region
    with open_slide(slide) as src:
        t0 = time.perf_counter()
        segment_region(seg, src, region, None)
        ours = time.perf_counter() - t0
        windows = 0
        for t in TISSUES:
            f = t.mpp / src.mpp
            tw, th = int(w / f), int(h / f)
            nx = max(1, (max(tw, 512) - 512) // 64 + 1)
            ny = max(1, (max(th, 512) - 512) // 64 + 1)
            windows += nx * ny  # one full network run per tissue per window
        sample = np.stack([src.read_at_mpp(1.0, y + 64 * i, x, 512, 512) for i in range(batch)])
    model = seg.model
    xt = seg.ckpt.normalize(torch.from_numpy(sample).permute(0, 3, 1, 2)).to(seg.device)
    with torch.inference_mode():
        model(xt, [0] * batch)
        reps = 2
        t0 = time.perf_counter()
        for _ in range(reps):
            model(xt, [0] * batch)
        per_window = (time.perf_counter() - t0) / (reps * batch)
    ref = windows * per_window
    return {"region": list(region), "ours_s": ours, "ref_window_forwards": windows, "ref_s_per_window": per_window,
            "ref_s": ref, "speedup": ref / ours}


def rss_child(slide: str, device: str, batch: int, out: str) -> None:
    from napari_omniseg.inference.engine import EngineConfig, Segmenter
    from napari_omniseg.inference.run import segment_to_store
    from napari_omniseg.slides import open_slide

    ck = load_model(None)
    seg = Segmenter(ck, EngineConfig(device=device, batch_size=batch))
    t0 = time.perf_counter()
    with open_slide(slide) as src:
        _, rep = segment_to_store(seg, src, out, ["glomerular_unit", "glomerular_tuft"])
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "tiles_run": rep.tiles_run, "tiles_skipped": rep.tiles_skipped,
                      "seconds": time.perf_counter() - t0}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEMO))
    p.add_argument("--size", type=int, default=20480, help="slide side at 40x (px); the RSS test also uses 2x this side")
    p.add_argument("--workdir", default="/tmp/omniseg-wsi")
    p.add_argument("--checkpoint")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--skip", nargs="*", default=[], help="parts to skip: a b c d")
    p.add_argument("--report", help="write markdown here")
    p.add_argument("--rss-child", nargs=2, metavar=("SLIDE", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.rss_child:
        rss_child(a.rss_child[0], a.device, a.batch_size, a.rss_child[1])
        return 0
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    patches = demo_patches(Path(a.data))
    t0 = time.perf_counter()
    slide = build_slide(work / f"renal-{a.size}.ome.tif", a.size, patches)
    print(f"slide {slide} ({a.size} x {a.size} px at 0.25 um/px) ready in {time.perf_counter() - t0:.0f} s", flush=True)
    ck = load_model(a.checkpoint)
    res = {"machine": machine(), "size": a.size, "model": getattr(ck, "version", "untrained")}
    if "a" not in a.skip:
        r = min(8192, a.size)
        res["a"] = bench_efficiency(ck, slide, (0, 0, r, r), a.device, a.batch_size)
        print("(a)", json.dumps(res["a"]), flush=True)
    if "b" not in a.skip:
        r = min(8192, a.size)
        res["b"] = bench_shared(ck, slide, (0, 0, r, r), a.device, a.batch_size)
        print("(b)", json.dumps(res["b"]), flush=True)
    if "c" not in a.skip:
        r = min(2048, a.size // 2)
        res["c"] = bench_reference(ck, slide, (a.size // 4, a.size // 4, r, r), a.device, a.batch_size)
        print("(c)", json.dumps(res["c"]), flush=True)
    if "d" not in a.skip:
        big = build_slide(work / f"renal-{2 * a.size}.ome.tif", 2 * a.size, patches)
        res["d"] = {}
        for name, s in (("1x", slide), ("4x", big)):
            out = work / f"rss-{name}-{time.time_ns()}.ome.zarr"
            cmd = [sys.executable, __file__, "--rss-child", str(s), str(out), "--device", a.device,
                   "--batch-size", str(a.batch_size), "--threads", str(a.threads)]
            r = subprocess.run(cmd, capture_output=True, text=True, check=True)
            res["d"][name] = json.loads(r.stdout.strip().splitlines()[-1])
            print("(d)", name, json.dumps(res["d"][name]), flush=True)
    (work / "results.json").write_text(json.dumps(res, indent=2))
    if a.report:
        Path(a.report).write_text(report(res, a))
    return 0


def report(res, a) -> str:
    L = [f"Measured with `python benchmarks/wsi_throughput.py --size {a.size} --batch-size {a.batch_size}"
         f"{' --threads ' + str(a.threads) if a.threads else ''}` on {res['machine']}; model {res['model']}.", ""]
    if "a" in res:
        r = res["a"]
        L.append(f"- (a) pipeline efficiency {r['efficiency']:.2f}: end to end {r['e2e_tiles_per_s']:.2f} tiles/s "
                 f"({r['tiles']} tiles of {r['tile_px']} px at 10x, three tissues, reading + resampling + model + "
                 f"blending + zarr writes) vs the bare model {r['bare_tiles_per_s']:.2f} tiles/s on the same tiles.")
    if "b" in res:
        r = res["b"]
        L.append(f"- (b) shared backbone speed-up {r['speedup']:.2f}x for the five 5x/10x tissues "
                 f"({r['shared_s']:.1f} s vs {r['per_tissue_s']:.1f} s for one run per tissue; masks identical: {r['identical']}).")
    if "c" in res:
        r = res["c"]
        L.append(f"- (c) speed-up over the reference plan {r['speedup']:.0f}x on a {r['region'][2]} x {r['region'][3]} px "
                 f"(40x) region, all six tissues: ours {r['ours_s']:.1f} s measured; reference "
                 f"{r['ref_window_forwards']} window forwards x {r['ref_s_per_window']:.3f} s measured per forward "
                 f"= {r['ref_s']:.0f} s.")
    if "d" in res:
        r = res["d"]
        L.append(f"- (d) peak RSS of a whole-slide run (glomerular unit + tuft, 5x): {r['1x']['peak_rss_mb']:.0f} MB "
                 f"for {a.size} x {a.size} px ({r['1x']['tiles_run']} tiles run, {r['1x']['seconds']:.0f} s) and "
                 f"{r['4x']['peak_rss_mb']:.0f} MB for {2 * a.size} x {2 * a.size} px ({r['4x']['tiles_run']} tiles, "
                 f"{r['4x']['seconds']:.0f} s).")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    sys.exit(main())
