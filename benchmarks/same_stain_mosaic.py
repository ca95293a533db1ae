"""Does a head lose its glomeruli when the engine's tile holds more tissue of one stain?

The dynamic head depends on the image through the feature vector pooled over the
whole model tile.  ``tile_size.py`` scores the demo's test mosaics, whose tiles mix
patches of four stains; a slide holds one.  This script joins the AIDPATH tiles
(1024 px at 0.5 um/px, 256 px at the glomerular 5x: one tile each when scored alone)
2 x 2 into images of one lab and stain (2048 px, 512 px at 5x: one 576 px engine
tile holds all four), segments them through the whole-slide engine with its default
settings, and scores every tile's quarter against its own mask.  The same tiles
scored alone (as ``external_tiles.py`` does) are printed beside, so the difference
is what the larger, single-stain context does to the head.

By default the tiles ``train_demo.py --hold-out-every 3`` kept out of training
(8 tiles, 2 mosaics, in file-name order).

    python benchmarks/same_stain_mosaic.py [--checkpoint C] [--all] [--threads 1] [--core 192 --margin 32] [--json out.json]
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
from napari_omniseg.training.data import load_dataset, read_image, read_mask, sample_mpp

AIDPATH = Path(__file__).resolve().parents[2] / "shared" / "data" / "aidpath-glomeruli" / "index.csv"


def _scores(pred: np.ndarray, gt: np.ndarray) -> dict:
    tp = float((pred & gt).sum())
    return {"dice": 2 * tp / max(1.0, float(pred.sum() + gt.sum())),
            "precision": tp / max(1.0, float(pred.sum())), "recall": tp / max(1.0, float(gt.sum()))}


def _segment(seg, img: np.ndarray, mpp: float, tissue: str) -> np.ndarray:
    """The engine's label map for ``tissue``, brought back to the image's own pixels."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res, _ = segment_region(seg, ImageSlide(img, mpp=mpp), None, [tissue])
    lab = res[tissue]
    f = lab.factor
    ys = np.minimum((np.arange(img.shape[0]) / f).astype(int) - lab.origin[0], lab.data.shape[0] - 1)
    xs = np.minimum((np.arange(img.shape[1]) / f).astype(int) - lab.origin[1], lab.data.shape[1] - 1)
    return lab.data[np.ix_(ys, xs)] == 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(AIDPATH))
    p.add_argument("--checkpoint")
    p.add_argument("--hold-out-every", type=int, default=3)
    p.add_argument("--all", action="store_true", help="every tile, also those trained on")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--core", type=int, help="engine block side (default: the engine's, 512)")
    p.add_argument("--margin", type=int, help="engine tile margin (default: the engine's, 32)")
    p.add_argument("--json")
    a = p.parse_args(argv)
    ck = load_checkpoint(resolve_checkpoint(a.checkpoint))
    kw = {k: v for k, v in (("core", a.core), ("margin", a.margin)) if v is not None}
    seg = Segmenter(ck, EngineConfig(device="cpu", threads=a.threads, **kw))
    samples = sorted(load_dataset(a.data), key=lambda s: str(s.image_path))
    if not a.all and a.hold_out_every:
        samples = [s for i, s in enumerate(samples) if i % a.hold_out_every == a.hold_out_every - 1]
    groups = [samples[i:i + 4] for i in range(0, len(samples) - 3, 4)]
    if not groups:
        p.error("need at least 4 images of one size to join 2 x 2")
    rows = []
    t0 = time.perf_counter()
    for g in groups:
        imgs = [read_image(s.image_path) for s in g]
        gts = [read_mask(s.label_path) for s in g]
        mpps = {sample_mpp(s) or s.tissue.mpp for s in g}
        tissues = {s.tissue.name for s in g}
        shapes = {im.shape for im in imgs}
        if len(mpps) != 1 or len(tissues) != 1 or len(shapes) != 1:
            print(f"skipped {[s.image_path.name for s in g]}: not one size, scale and tissue")
            continue
        mpp, tissue = mpps.pop(), tissues.pop()
        h, w = imgs[0].shape[:2]
        mosaic = np.block([[imgs[0], imgs[1]], [imgs[2], imgs[3]]]) if imgs[0].ndim == 2 else \
            np.concatenate([np.concatenate(imgs[:2], 1), np.concatenate(imgs[2:], 1)], 0)
        big = _segment(seg, mosaic, mpp, tissue)
        for k, (s, img, gt) in enumerate(zip(g, imgs, gts)):
            y, x = (k // 2) * h, (k % 2) * w
            inside = _scores(big[y:y + h, x:x + w], gt)
            alone = _scores(_segment(seg, img, mpp, tissue), gt)
            rows.append({"image": s.image_path.name, "tissue": tissue, "alone": alone, "in_mosaic": inside})
            print(f"{s.image_path.name:<14} {tissue:<16} alone Dice {alone['dice']:.3f} (P {alone['precision']:.2f} "
                  f"R {alone['recall']:.2f})   in a 2x2 mosaic {inside['dice']:.3f} (P {inside['precision']:.2f} "
                  f"R {inside['recall']:.2f})", flush=True)
    mean = {w: {k: float(np.mean([r[w][k] for r in rows])) for k in ("dice", "precision", "recall")}
            for w in ("alone", "in_mosaic")}
    print(f"model {ck.version}: {len(rows)} tiles in {len(rows) // 4} mosaics; mean Dice alone {mean['alone']['dice']:.3f} "
          f"(precision {mean['alone']['precision']:.3f}, recall {mean['alone']['recall']:.3f}), in the mosaic "
          f"{mean['in_mosaic']['dice']:.3f} (precision {mean['in_mosaic']['precision']:.3f}, recall "
          f"{mean['in_mosaic']['recall']:.3f}) ({time.perf_counter() - t0:.0f} s)")
    if a.json:
        Path(a.json).write_text(json.dumps({"model": ck.version, "rows": rows, "mean": mean}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
