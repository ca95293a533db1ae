"""Labelled images from another lab, through the whole-slide engine.

Each image of a labelled folder or CSV (e.g. the AIDPATH glomeruli tiles) is opened
as a one-level slide at its own um/px, segmented for its tissue with the default
engine settings (576 px model tiles, background skipped), and the label map is
scored against the mask at the image's own resolution (the labels are upsampled,
as the viewer shows them). Prints foreground Dice, precision and recall per image
and their means; with ``--hold-out-every N`` only every N-th image by file name
(the ones ``train_demo.py --hold-out-every N`` kept out of training).

    python benchmarks/external_tiles.py ../shared/data/aidpath-glomeruli/index.csv --hold-out-every 3 [--checkpoint C]

``--declare-um-per-px X`` opens every image as if its pixels were X um wide, to see
the same structures at another size: with the AIDPATH tiles (0.5 um/px), X = 0.25
halves every glomerulus at the model's 5x (a stand-in for mouse glomeruli), X = 1.0
doubles it.  ``--exclude NAME ...`` also prints the mean without the images named there.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np

from napari_omniseg.inference.engine import EngineConfig, Segmenter, segment_region
from napari_omniseg.model import load_checkpoint, resolve_checkpoint
from napari_omniseg.slides import ImageSlide
from napari_omniseg.training.data import load_dataset, read_image, read_mask, sample_mpp


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data")
    p.add_argument("--checkpoint")
    p.add_argument("--hold-out-every", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--declare-um-per-px", type=float, metavar="X",
                   help="open every image as if its pixels were X um (objects look X / true size larger at 5x)")
    p.add_argument("--exclude", nargs="*", default=[], metavar="NAME",
                   help="image file names also left out of a second mean (e.g. tiles whose masks miss a structure)")
    p.add_argument("--json")
    a = p.parse_args(argv)
    if a.declare_um_per_px is not None and a.declare_um_per_px <= 0:
        p.error("--declare-um-per-px must be positive")
    ck = load_checkpoint(resolve_checkpoint(a.checkpoint))
    seg = Segmenter(ck, EngineConfig(device="cpu", threads=a.threads))
    samples = sorted(load_dataset(a.data), key=lambda s: str(s.image_path))
    if a.hold_out_every:
        samples = [s for i, s in enumerate(samples) if i % a.hold_out_every == a.hold_out_every - 1]
    rows = []
    t0 = time.perf_counter()
    for s in samples:
        img, gt = read_image(s.image_path), read_mask(s.label_path)
        mpp = a.declare_um_per_px or sample_mpp(s) or s.tissue.mpp
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res, _ = segment_region(seg, ImageSlide(img, mpp=mpp), None, [s.tissue.name])
        lab = res[s.tissue.name]
        f = lab.factor
        ys = np.minimum((np.arange(gt.shape[0]) / f).astype(int) - lab.origin[0], lab.data.shape[0] - 1)
        xs = np.minimum((np.arange(gt.shape[1]) / f).astype(int) - lab.origin[1], lab.data.shape[1] - 1)
        pred = lab.data[np.ix_(ys, xs)] == 1
        tp = float((pred & gt).sum())
        d = 2 * tp / max(1.0, float(pred.sum() + gt.sum()))
        rows.append({"image": s.image_path.name, "tissue": s.tissue.name, "dice": d,
                     "precision": tp / max(1.0, float(pred.sum())), "recall": tp / max(1.0, float(gt.sum()))})
        print(f"{s.image_path.name:<16} {s.tissue.name:<18} Dice {d:.3f}  precision {rows[-1]['precision']:.3f}  "
              f"recall {rows[-1]['recall']:.3f}", flush=True)
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("dice", "precision", "recall")}
    print(f"model {ck.version}, threshold(s) {ck.thresholds or 0.5}: {len(rows)} images, mean Dice {mean['dice']:.3f}, "
          f"precision {mean['precision']:.3f}, recall {mean['recall']:.3f} ({time.perf_counter() - t0:.0f} s)")
    kept = [r for r in rows if r["image"] not in set(a.exclude)]
    if a.exclude and kept:
        mean["dice_without_excluded"] = float(np.mean([r["dice"] for r in kept]))
        print(f"without {', '.join(a.exclude)}: {len(kept)} images, mean Dice {mean['dice_without_excluded']:.3f}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"model": ck.version, "declared_um_per_px": a.declare_um_per_px, "rows": rows, "mean": mean},
                      fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
