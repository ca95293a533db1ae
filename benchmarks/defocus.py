"""How much each head loses when the image is less sharp than the training scans.

A slide from another scanner, a patch slightly out of focus, or a tile resampled
from a coarser scan carries the same structures with less fine detail.  This scores a
checkpoint on full patches, each tissue cut at its calibrated threshold, after one of
these degradations at the tissue's magnification:

- ``blurS``: a Gaussian blur with sigma S pixels;
- ``resF``: the image shrunk F times (anti-aliased) and enlarged back (bilinear),
  i.e. a scan with F times coarser pixels.

Sets: the renal-demo test split (23 patches) and the AIDPATH tiles held out of the
shipped model's training (every third by name; ``--hold-out-every``).  Prints mean
foreground Dice per tissue for each degradation; ``--json`` keeps the rows.

    python benchmarks/defocus.py --threads 2 [--checkpoint C] [--json runs/defocus.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from napari_omniseg.inference.precision import autocast, describe, resolve_precision
from napari_omniseg.model import load_checkpoint, resolve_checkpoint
from napari_omniseg.model.network import fg_probability
from napari_omniseg.training.data import load_arrays, load_dataset, select
from napari_omniseg.training.loop import _pad_to, _stat_masks
from napari_omniseg.training.metrics import dice

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT.parent / "shared" / "data" / "renal-demo"
AIDPATH = ROOT.parent / "shared" / "data" / "aidpath-glomeruli" / "index.csv"
DEFAULT = ["none", "blur0.7", "blur1", "blur1.5", "res1.5", "res2"]


def degrade(img: np.ndarray, how: str) -> np.ndarray:
    if how == "none":
        return img
    if how.startswith("blur"):
        s = float(how[4:])
        return ndi.gaussian_filter(img, sigma=(s, s, 0))
    if how.startswith("res"):
        f = float(how[3:])
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None]
        small = F.interpolate(x, scale_factor=1.0 / f, mode="bilinear", antialias=True)
        return F.interpolate(small, size=x.shape[-2:], mode="bilinear")[0].permute(1, 2, 0).numpy()
    raise ValueError(f"unknown degradation {how!r} (none, blurS, resF)")


@torch.inference_mode()
def probability(ck, img: np.ndarray, tissue_id: int, precision: str, mpp: float) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None]
    sm = _stat_masks(x.float() / 255.0, [mpp], ck.model)  # a model trained on its tissue's statistics
    x, crop = _pad_to(ck.normalize(x), ck.model.cfg.divisor)
    sm = None if sm is None else _pad_to(sm, ck.model.cfg.divisor)[0]
    with autocast(precision, "cpu"):
        p = fg_probability(ck.model.heads(ck.model.features(x, sm), [tissue_id])[:, 0].float())
    return p[0, : crop[0], : crop[1]].numpy()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint")
    ap.add_argument("--data", default=str(DEMO))
    ap.add_argument("--external", default=str(AIDPATH))
    ap.add_argument("--hold-out-every", type=int, default=3)
    ap.add_argument("--degradations", nargs="+", default=DEFAULT)
    ap.add_argument("--precision", default="auto", help="auto (bf16 where the CPU is fast at it), fp32, bf16")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    prec = resolve_precision(a.precision, "cpu")
    print("machine:", describe("cpu", prec, a.threads), flush=True)
    ck = load_checkpoint(resolve_checkpoint(a.checkpoint))
    ck.model.eval()
    sets = {"test split": load_arrays(select(load_dataset(a.data), "test"))}
    if Path(a.external).exists():
        ext = sorted(load_dataset(a.external), key=lambda s: str(s.image_path))
        k = a.hold_out_every
        held = [s for i, s in enumerate(ext) if k and i % k == k - 1] if k else ext
        sets["external held out"] = load_arrays([copy.deepcopy(s) for s in held])
    rows = []
    for how in a.degradations:
        t0 = time.perf_counter()
        for name, samples in sets.items():
            per: dict = {}
            for s in samples:
                p = probability(ck, degrade(s.image, how), s.tissue.id, prec, s.tissue.mpp)
                per.setdefault(s.tissue.name, []).append(dice(p > ck.threshold(s.tissue.name), s.mask > 0))
            n = {t: len(v) for t, v in per.items()}
            per = {t: float(np.mean(v)) for t, v in sorted(per.items())}
            mean = float(np.mean(list(per.values())))
            rows.append({"degradation": how, "set": name, "mean": mean, "per_tissue": per, "n": n})
            print(f"{how:<8} {name:<18} mean {mean:.3f}  " + "  ".join(f"{t} {v:.3f}" for t, v in per.items()),
                  flush=True)
        print(f"({how}: {time.perf_counter() - t0:.0f} s)", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"checkpoint": str(resolve_checkpoint(a.checkpoint)), "precision": prec,
                                            "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
