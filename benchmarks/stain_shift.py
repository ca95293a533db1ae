"""How much does the model lose when the same tissue arrives in another lab's colours?

Every test patch of the demo is recoloured (Reinhard, in CIELAB, tissue pixels only)
to the colour statistics of each stain of the demo's train + validation patches (H&E,
PAS, silver, trichrome) and of the AIDPATH tiles (another lab's PAS), and scored with
its own tissue's head at the checkpoint's thresholds. The structures stay those of the
original stain, only the colours move, so this measures colour robustness, not the
staining pattern of another stain (leave_one_stain_out.py measures that, by training).

    python benchmarks/stain_shift.py [--checkpoint A --checkpoint B ...] [--threads 1]

Prints, per checkpoint, one line per target colour (test mean Dice and per tissue),
then the mean over the recolourings of each patch into a stain other than its own and
the worst target, against the unchanged patches.
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
from pathlib import Path

import numpy as np
import torch

from napari_omniseg.model import load_checkpoint, resolve_checkpoint
from napari_omniseg.tissues import TISSUES
from napari_omniseg.training.data import load_arrays, load_dataset, read_image, select
from napari_omniseg.training.loop import evaluate_samples
from stain_normalisation import _pooled, reinhard

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", help="repeatable; default: the active model")
    p.add_argument("--demo", default=str(SHARED / "renal-demo"))
    p.add_argument("--aidpath", default=str(SHARED / "aidpath-glomeruli"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write the figures here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    samples = load_dataset(a.demo)
    train = load_arrays(select(samples, ["train", "val"]))
    test = load_arrays(select(samples, "test"))
    refs = {st: _pooled([s.image for s in train if s.stain == st]) for st in sorted({s.stain for s in train})}
    tiles = sorted(glob.glob(str(Path(a.aidpath) / "images" / "*.png")))
    if tiles:
        refs["aidpath"] = _pooled([read_image(n) for n in tiles])
    moved = {"own": test}
    for name, ref in refs.items():
        out = []
        for s in test:
            c = copy.copy(s)
            c.image = reinhard(s.image, ref)
            out.append(c)
        moved[name] = out
    short = {t.name: t.short for t in TISSUES}
    report = {}
    for cp in a.checkpoint or [None]:
        ck = load_checkpoint(resolve_checkpoint(cp))
        print(f"model {ck.version}: {len(test)} test patches, targets {', '.join(refs)}", flush=True)
        rows, per_patch = {}, {}
        for name, group in moved.items():
            scores, summ = evaluate_samples(ck, group)
            rows[name] = summ
            per_patch[name] = scores
            per = " ".join(f"{short.get(t, t)} {v['dice']:.3f}" for t, v in sorted(summ["per_tissue"].items()))
            print(f"  {name:<8} mean {summ['mean_dice']:.3f}  ({per})", flush=True)
        # the per-tissue mean over each patch's recolourings into stains other than its own
        other = {}
        for i, s in enumerate(test):
            vals = [per_patch[n][i]["dice"] for n in refs if n != s.stain]
            other.setdefault(s.tissue.name, []).append(float(np.mean(vals)))
        other_mean = float(np.mean([np.mean(v) for v in other.values()]))
        worst = min((n for n in refs), key=lambda n: rows[n]["mean_dice"])
        print(f"  own colours {rows['own']['mean_dice']:.3f}; other stains' colours, mean over targets "
              f"{other_mean:.3f} ({other_mean - rows['own']['mean_dice']:+.3f}); worst target {worst} "
              f"{rows[worst]['mean_dice']:.3f}", flush=True)
        report[ck.version] = {"targets": {n: {"mean_dice": r["mean_dice"],
                                              "per_tissue": {t: v["dice"] for t, v in r["per_tissue"].items()}}
                                          for n, r in rows.items()},
                              "other_stains_mean": other_mean, "worst_target": worst}
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
