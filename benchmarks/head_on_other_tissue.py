"""How much of another tissue a head marks: false positives on labelled structures.

A pixel labelled as one tissue is, by the tissue registry's relations, background
for every tissue it excludes (a tubule is never glomerulus). This script runs one
head (by default the glomerular unit) through the whole-slide engine on the patches
labelled for other tissues (by default the distal and proximal tubules and the
artery), each at its own um/px, and prints the share of their labelled pixels the
head marks: 0 % is a head that does not fire on tubules.

    python benchmarks/head_on_other_tissue.py --split test [--checkpoint C] [--head glomerular_unit]
"""

from __future__ import annotations

import argparse
import json
import warnings

import numpy as np

from napari_omniseg.inference.engine import EngineConfig, Segmenter, segment_region
from napari_omniseg.model import load_checkpoint, resolve_checkpoint
from napari_omniseg.slides import ImageSlide
from napari_omniseg.tissues import exclusive, get_tissue
from napari_omniseg.training.data import load_dataset, read_image, read_mask, sample_mpp, select

from wsi_throughput import DEMO  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEMO))
    p.add_argument("--split", default="test", help="split(s), e.g. test or train+val+test")
    p.add_argument("--head", default="glomerular_unit")
    p.add_argument("--on", default="distal_tubule,proximal_tubule,artery",
                   help="the tissues whose labelled pixels the head must leave alone")
    p.add_argument("--checkpoint")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json")
    a = p.parse_args(argv)
    head = get_tissue(a.head)
    on = [get_tissue(t) for t in a.on.split(",")]
    if not all(exclusive(head, t) for t in on):
        p.error(f"the registry does not say {a.head} excludes every tissue of --on")
    ck = load_checkpoint(resolve_checkpoint(a.checkpoint))
    seg = Segmenter(ck, EngineConfig(device="cpu", threads=a.threads))
    rows = []
    for s in sorted(select(load_dataset(a.data), a.split, [t.name for t in on]), key=lambda s: str(s.image_path)):
        img, gt = read_image(s.image_path), read_mask(s.label_path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res, _ = segment_region(seg, ImageSlide(img, mpp=sample_mpp(s) or s.tissue.mpp), None, [head.name])
        lab = res[head.name]
        ys = np.minimum((np.arange(gt.shape[0]) / lab.factor).astype(int) - lab.origin[0], lab.data.shape[0] - 1)
        xs = np.minimum((np.arange(gt.shape[1]) / lab.factor).astype(int) - lab.origin[1], lab.data.shape[1] - 1)
        pred = lab.data[np.ix_(ys, xs)] == 1
        rows.append({"image": s.image_path.name, "tissue": s.tissue.name, "stain": s.stain,
                     "marked_of_labelled": float((pred & gt).sum()) / max(1, int(gt.sum())),
                     "marked_of_image": float(pred.mean())})
        r = rows[-1]
        print(f"{s.image_path.name:<40} {s.tissue.name:<16} {s.stain:<4} {a.head} on its labelled pixels "
              f"{100 * r['marked_of_labelled']:5.1f} %, on the image {100 * r['marked_of_image']:5.1f} %", flush=True)
    by = {}
    for t in on:
        sel = [r for r in rows if r["tissue"] == t.name]
        if sel:
            by[t.name] = float(np.mean([r["marked_of_labelled"] for r in sel]))
    allm = float(np.mean([r["marked_of_labelled"] for r in rows])) if rows else float("nan")
    print(f"model {ck.version}: {a.head} marks " + ", ".join(f"{100 * v:.1f} % of {k}" for k, v in by.items())
          + f" (mean over {len(rows)} patches {100 * allm:.1f} %)")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"model": ck.version, "head": a.head, "rows": rows, "per_tissue": by, "mean": allm}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
