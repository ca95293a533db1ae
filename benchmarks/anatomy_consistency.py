"""Anatomy at inference: does making an outer tissue's mask agree with its inner tissue help?

The tissue registry says some tissues lie inside others (the glomerular tuft inside the
glomerular unit, ``Tissue.inside``).  When both heads run on the same image at the same
magnification, their masks can be made to agree with that relation after the fact:

- ``union``: the outer mask also covers every inner pixel (a tuft found without its
  capsule becomes a unit);
- ``gate``: outer objects (connected components) that hold fewer than ``--min-inner``
  inner pixels are dropped (a "glomerulus" with no tuft in it is not one);
- ``gate+union``: both.

Every pair comes from the registry (no tissue names in this file).  Both heads run
through the whole-slide engine with its default settings, each tissue cut at the
checkpoint's threshold, on:

- the renal-demo test split: the outer tissue's patches (Dice of the outer head), the
  inner tissue's patches (Dice of the inner head, unchanged by these rules: a check),
  and the patches of every tissue the outer one excludes (share of their labelled
  pixels the outer head marks: false positives);
- the AIDPATH tiles held out of the shipped model's training (every third by name), at
  their own um/px, declared at 0.25 um/px (read at half the pixels: glomeruli at half
  size at 5x) and at 1.0 um/px (glomeruli at twice their size);
- the bundled non-kidney slide (CMU-1-Small-Region.svs): share of its tissue marked.

    python benchmarks/anatomy_consistency.py [--checkpoint C] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from napari_omniseg._sample_data import find_sample_slide
from napari_omniseg.demo import upsample_to
from napari_omniseg.inference.engine import EngineConfig, Segmenter, segment_region
from napari_omniseg.model import load_checkpoint, resolve_checkpoint
from napari_omniseg.slides import ImageSlide, open_slide
from napari_omniseg.slides.tissue_mask import tissue_mask
from napari_omniseg.tissues import contains, exclusive, with_registry_relations
from napari_omniseg.training.data import load_dataset, read_image, read_mask, sample_mpp, select

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT.parent / "shared" / "data" / "renal-demo"
AIDPATH = ROOT.parent / "shared" / "data" / "aidpath-glomeruli" / "index.csv"
RULES = ("none", "union", "gate", "gate+union")


def gate(outer: np.ndarray, inner: np.ndarray, min_inner: int) -> np.ndarray:
    """``outer`` without its connected components that hold < ``min_inner`` ``inner`` pixels."""
    lab, n = ndi.label(outer)
    if not n:
        return outer
    held = np.bincount(lab.ravel(), weights=inner.ravel().astype(np.float64), minlength=n + 1)
    keep = held >= min_inner
    keep[0] = False
    return keep[lab]


def apply(rule: str, outer: np.ndarray, inner: np.ndarray, min_inner: int) -> np.ndarray:
    out = outer
    if "gate" in rule:
        out = gate(out, inner, min_inner)
    if "union" in rule:
        out = out | inner
    return out


def on_image_grid(lab, mask: np.ndarray, shape) -> np.ndarray:
    """A label-grid mask resampled to the image's pixels, as the viewer shows it."""
    f = lab.factor
    ys = np.minimum((np.arange(shape[0]) / f).astype(int) - lab.origin[0], mask.shape[0] - 1)
    xs = np.minimum((np.arange(shape[1]) / f).astype(int) - lab.origin[1], mask.shape[1] - 1)
    return mask[np.ix_(ys, xs)]


def dice(p: np.ndarray, g: np.ndarray) -> float:
    return 2 * float((p & g).sum()) / max(1.0, float(p.sum() + g.sum()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint")
    ap.add_argument("--data", default=str(DEMO))
    ap.add_argument("--external", default=str(AIDPATH))
    ap.add_argument("--hold-out-every", type=int, default=3)
    ap.add_argument("--min-inner", type=int, default=4, help="inner pixels (on the label grid) an outer object needs")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    ck = load_checkpoint(resolve_checkpoint(a.checkpoint))
    seg = Segmenter(ck, EngineConfig(device="cpu", threads=a.threads))
    tissues = with_registry_relations(ck.tissues)  # checkpoints may predate a relation; anatomy is the registry's
    pairs = [(o, i) for o in tissues for i in tissues if contains(o, i) and o.magnification == i.magnification]
    if not pairs:
        ap.error("the checkpoint's tissues hold no (outer, inner) pair at one magnification")
    t0 = time.perf_counter()
    rows: dict = {}

    def add(key, rule, value):
        rows.setdefault(key, {}).setdefault(rule, []).append(value)

    def both(img, mpp, outer, inner):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res, _ = segment_region(seg, ImageSlide(img, mpp=mpp), None, [outer.name, inner.name])
        lo, li = res[outer.name], res[inner.name]
        if lo.factor != li.factor or tuple(lo.origin) != tuple(li.origin):
            raise RuntimeError("outer and inner labels are not on one grid")
        return lo, lo.data == 1, li.data == 1

    samples = load_dataset(a.data)
    ext = sorted(load_dataset(a.external), key=lambda s: str(s.image_path)) if Path(a.external).exists() else []
    k = a.hold_out_every
    held = [s for i, s in enumerate(ext) if not k or i % k == k - 1]
    for outer, inner in pairs:
        excluded = [t.name for t in tissues if exclusive(outer, t) and t.name != inner.name]
        names = [outer.name, inner.name, *excluded]
        for s in sorted(select(samples, "test", names), key=lambda s: str(s.image_path)):
            img, gt = read_image(s.image_path), read_mask(s.label_path) > 0
            lab, o, i = both(img, sample_mpp(s) or s.tissue.mpp, outer, inner)
            for rule in RULES:
                p = on_image_grid(lab, apply(rule, o, i, a.min_inner), gt.shape)
                if s.tissue.name == outer.name:
                    add(f"test: {outer.name} Dice", rule, dice(p, gt))
                elif s.tissue.name == inner.name:
                    add(f"test: {inner.name} Dice (unchanged)", rule, dice(on_image_grid(lab, i, gt.shape), gt))
                else:
                    add(f"test: {outer.name} on {s.tissue.name} pixels, %", rule,
                        100 * float((p & gt).sum()) / max(1, int(gt.sum())))
        for declared in (None, 0.25, 1.0):
            for s in held:
                if s.tissue.name != outer.name:
                    continue
                img, gt = read_image(s.image_path), read_mask(s.label_path) > 0
                lab, o, i = both(img, declared or sample_mpp(s) or s.tissue.mpp, outer, inner)
                tag = "own um/px" if declared is None else f"declared {declared} um/px"
                for rule in RULES:
                    add(f"external held out ({tag}): {outer.name} Dice", rule,
                        dice(on_image_grid(lab, apply(rule, o, i, a.min_inner), gt.shape), gt))
        with open_slide(find_sample_slide()) as src:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res, _ = segment_region(seg, src, None, [outer.name, inner.name])
            H, W = src.shapes[0]
            m, m_mpp = tissue_mask(src)
            tissue = upsample_to(m, (H, W), m_mpp / src.mpp)
        lo, li = res[outer.name], res[inner.name]
        for rule in RULES:
            g = upsample_to(apply(rule, lo.data == 1, li.data == 1, a.min_inner).astype(np.uint8), (H, W), lo.factor)
            add(f"non-kidney slide: {outer.name}, % of tissue", rule, 100 * float(((g == 1) & tissue).sum()) / max(1, int(tissue.sum())))
    print(f"model {ck.version}, {time.perf_counter() - t0:.0f} s; rules need >= {a.min_inner} inner pixels per outer object")
    print("| measurement | n | " + " | ".join(RULES) + " |")
    print("|---|---:|" + "---:|" * len(RULES))
    for key, per in rows.items():
        n = len(per["none"])
        print(f"| {key} | {n} | " + " | ".join(f"{np.mean(per[r]):.3f}" if "Dice" in key else f"{np.mean(per[r]):.1f}"
                                           for r in RULES) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps({"model": ck.version, "min_inner": a.min_inner, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
