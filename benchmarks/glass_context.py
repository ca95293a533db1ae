"""How much does glass around the tissue cost?  The network normalises (GroupNorm) and
pools its head vector over the whole engine tile, glass included; on a slide, tiles at
the edge of a biopsy or around a small fragment are mostly glass.

Each image (the demo's 23 test patches at their magnification, and the AIDPATH tiles
``train_demo.py --hold-out-every 3`` kept out of training) is placed in the middle of a
canvas of glass (RGB 243 with a little noise, as scanners give it) K times its side,
segmented through the whole-slide engine with its default settings, and scored on the
image's own pixels.  K = 1 is the image alone.

    python benchmarks/glass_context.py [--checkpoint C] [--sizes 1 2 3] [--threads 2]
        [--whole-tile-statistics] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np

from napari_omniseg.inference.engine import EngineConfig, Segmenter, segment_region
from napari_omniseg.model import load_checkpoint, resolve_checkpoint
from napari_omniseg.slides import ImageSlide
from napari_omniseg.training.data import load_dataset, read_image, read_mask, sample_mpp, select

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _segment(seg, img: np.ndarray, mpp: float, tissue: str) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res, _ = segment_region(seg, ImageSlide(img, mpp=mpp), None, [tissue])
    lab = res[tissue]
    f = lab.factor
    ys = np.minimum((np.arange(img.shape[0]) / f).astype(int) - lab.origin[0], lab.data.shape[0] - 1)
    xs = np.minimum((np.arange(img.shape[1]) / f).astype(int) - lab.origin[1], lab.data.shape[1] - 1)
    return lab.data[np.ix_(ys, xs)] == 1


def _dice(p: np.ndarray, g: np.ndarray) -> float:
    return float(2 * (p & g).sum() / max(1, int(p.sum() + g.sum())))


def on_glass(img: np.ndarray, k: float, rng: np.random.Generator) -> tuple[np.ndarray, int, int]:
    """``img`` in the middle of a glass canvas ``k`` times its side; returns it and the offset."""
    h, w = img.shape[:2]
    if k == 1:
        return img, 0, 0
    ch, cw = int(round(k * h)), int(round(k * w))
    canvas = np.clip(rng.normal(243, 2, (ch, cw, 3)), 0, 255).astype(np.uint8)
    y, x = (ch - h) // 2, (cw - w) // 2
    canvas[y:y + h, x:x + w] = img
    return canvas, y, x


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint")
    p.add_argument("--demo", default=str(SHARED / "renal-demo"))
    p.add_argument("--aidpath", default=str(SHARED / "aidpath-glomeruli" / "index.csv"))
    p.add_argument("--sizes", type=float, nargs="+", default=[1, 2, 3])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--whole-tile-statistics", action="store_true",
                   help="normalise over the whole tile, glass included (EngineConfig.tissue_statistics off)")
    p.add_argument("--json")
    a = p.parse_args(argv)
    ck = load_checkpoint(resolve_checkpoint(a.checkpoint))
    seg = Segmenter(ck, EngineConfig(device="cpu", threads=a.threads,
                                           tissue_statistics=not a.whole_tile_statistics))
    test = select(load_dataset(a.demo), "test") if Path(a.demo).exists() else []
    aid = []
    if Path(a.aidpath).exists():
        aid = sorted(load_dataset(a.aidpath), key=lambda s: str(s.image_path))
        aid = [s for i, s in enumerate(aid) if i % 3 == 2]
    if not test and not aid:
        p.error("neither --demo nor --aidpath data found")
    out = {"model": ck.version, "tissue_statistics": not a.whole_tile_statistics, "sizes": {}}
    t0 = time.perf_counter()
    for k in a.sizes:
        rng = np.random.default_rng(0)
        per: dict[str, list[float]] = {}
        for s in test:
            img = read_image(s.image_path)[..., :3]
            c, y, x = on_glass(img, k, rng)
            pred = _segment(seg, c, s.tissue.mpp, s.tissue.name)[y:y + img.shape[0], x:x + img.shape[1]]
            per.setdefault(s.tissue.name, []).append(_dice(pred, read_mask(s.label_path) > 0))
        aid_d = []
        for s in aid:
            img = read_image(s.image_path)[..., :3]
            c, y, x = on_glass(img, k, rng)
            pred = _segment(seg, c, sample_mpp(s) or s.tissue.mpp, s.tissue.name)[y:y + img.shape[0], x:x + img.shape[1]]
            aid_d.append(_dice(pred, read_mask(s.label_path) > 0))
        tissues = {t: float(np.mean(v)) for t, v in per.items()}
        row = {"test_per_tissue": tissues, "test_mean": float(np.mean(list(tissues.values()))) if tissues else None,
               "aidpath_mean": float(np.mean(aid_d)) if aid_d else None}
        out["sizes"][f"{k:g}"] = row
        line = "  ".join(f"{t} {v:.3f}" for t, v in tissues.items())
        print(f"glass canvas {k:g}x: test mean {row['test_mean'] if row['test_mean'] is None else round(row['test_mean'], 3)}"
              f" ({line}); AIDPATH held out {row['aidpath_mean'] if row['aidpath_mean'] is None else round(row['aidpath_mean'], 3)}",
              flush=True)
    print(f"model {ck.version}, statistics over {'the whole tile' if a.whole_tile_statistics else 'tissue only'}"
          f" ({time.perf_counter() - t0:.0f} s)")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
