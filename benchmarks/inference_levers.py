"""Inference-time levers on a trained model, without retraining: flip averaging and
mask clean-up, scored on the test split and on held-out tiles of another lab.

For each patch the model's probability for the patch's own tissue is computed
(full patch, as ``omniseg evaluate`` does) plain, averaged over the 4 flips
(identity, horizontal, vertical, both) or over the 8 flips and transposes, then cut
at the checkpoint's calibrated threshold and optionally cleaned up:

- ``fill``: holes inside each object filled (every tissue but the capillary, whose
  lumen is part of the annotation's ring shape);
- ``fill+min``: also objects under 1,000 um^2 removed (10 um^2 for the capillary).

Sets: the renal-demo test split (23 patches), the AIDPATH tiles held out of training
(every third by name; ``--hold-out-every``), and the same tiles declared at 0.25
instead of 0.5 um/px, so they are read at half the pixels and their glomeruli are
half as large at 5x (a stand-in for smaller glomeruli, e.g. mouse), and declared at
1.0 um/px (glomeruli twice as large).  Prints mean foreground Dice per tissue.

    python benchmarks/inference_levers.py --threads 2 [--checkpoint C] [--modes none flip4 d8]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi

from napari_omniseg.model import load_checkpoint, resolve_checkpoint
from napari_omniseg.model.network import fg_probability
from napari_omniseg.training.data import load_arrays, load_dataset, select
from napari_omniseg.training.loop import _pad_to
from napari_omniseg.training.metrics import dice

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT.parent / "shared" / "data" / "renal-demo"
AIDPATH = ROOT.parent / "shared" / "data" / "aidpath-glomeruli" / "index.csv"
CAPILLARY = "peritubular_capillary"


def flips(mode: str):
    """(horizontal, vertical, transpose) of each view."""
    if mode == "none":
        return [(False, False, False)]
    views = [(h, v, False) for h in (False, True) for v in (False, True)]
    if mode == "d8":
        views += [(h, v, True) for h in (False, True) for v in (False, True)]
    return views


@torch.inference_mode()
def probability(ck, img: np.ndarray, tissue_id: int, mode: str) -> np.ndarray:
    x = torch.from_numpy(img).permute(2, 0, 1)[None]
    x, crop = _pad_to(ck.normalize(x), ck.model.cfg.divisor)
    out = []
    for h, v, tr in flips(mode):
        y = x.transpose(-1, -2) if tr else x
        y = y.flip(-1) if h else y
        y = y.flip(-2) if v else y
        p = fg_probability(ck.model(y, [tissue_id]).float())
        p = p.flip(-2) if v else p
        p = p.flip(-1) if h else p
        out.append(p.transpose(-1, -2) if tr else p)
    return torch.stack(out).mean(0)[0, : crop[0], : crop[1]].numpy()


def clean(mask: np.ndarray, tissue: str, mpp: float, how: str) -> np.ndarray:
    if how == "none":
        return mask
    if tissue != CAPILLARY:
        mask = ndi.binary_fill_holes(mask)
    if how == "fill+min":
        min_px = (10.0 if tissue == CAPILLARY else 1000.0) / mpp**2
        lab, n = ndi.label(mask)
        if n:
            keep = np.bincount(lab.ravel()) >= min_px
            keep[0] = False
            mask = keep[lab]
    return mask


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint")
    ap.add_argument("--data", default=str(DEMO))
    ap.add_argument("--external", default=str(AIDPATH))
    ap.add_argument("--hold-out-every", type=int, default=3)
    ap.add_argument("--modes", nargs="+", default=["none", "flip4", "d8"], choices=["none", "flip4", "d8"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    ck = load_checkpoint(resolve_checkpoint(a.checkpoint))
    ck.model.eval()
    sets = {"test split": load_arrays(select(load_dataset(a.data), "test"))}
    if Path(a.external).exists():
        ext = sorted(load_dataset(a.external), key=lambda s: str(s.image_path))
        k = a.hold_out_every
        held = [s for i, s in enumerate(ext) if k and i % k == k - 1] if k else ext
        sets["external held out"] = load_arrays([copy.deepcopy(s) for s in held])
        for declared, label in (("0.25", "glomeruli at half size"), ("1.0", "glomeruli at twice their size")):
            # a coarser declared pixel means fewer pixels are dropped on the way to 5x: larger objects
            resized = []
            for s in held:
                s2 = copy.deepcopy(s)
                s2.meta.pop("mpp", None)
                s2.meta["um_per_px"] = declared
                s2.image, s2.mask = None, None
                resized.append(s2)
            sets[f"external, {label}"] = load_arrays(resized)
    rows = []
    for mode in a.modes:
        t0 = time.perf_counter()
        for name, samples in sets.items():
            probs = [probability(ck, s.image, s.tissue.id, mode) for s in samples]
            for how in ("none", "fill", "fill+min"):
                per: dict = {}
                for p, s in zip(probs, samples):
                    m = clean(p > ck.threshold(s.tissue.name), s.tissue.name, s.tissue.mpp, how)
                    per.setdefault(s.tissue.name, []).append(dice(m, s.mask > 0))
                per = {t: float(np.mean(v)) for t, v in sorted(per.items())}
                mean = float(np.mean(list(per.values())))
                rows.append({"views": mode, "set": name, "clean-up": how, "mean": mean, "per_tissue": per})
                print(f"{mode:<6} {name:<34} {how:<9} mean {mean:.3f}  "
                      + "  ".join(f"{t} {v:.3f}" for t, v in per.items()), flush=True)
        print(f"({mode}: {time.perf_counter() - t0:.0f} s)", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
