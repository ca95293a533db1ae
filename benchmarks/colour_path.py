"""Which path of the network carries its colour dependence?

The network reads an image along two paths: the spatial features every head is
applied to, and the pooled vector from which the controller generates the heads
themselves. Each test patch of the demo is recoloured as in ``stain_shift.py``
(Reinhard, CIELAB, to the colour statistics of each other demo stain and of the
AIDPATH tiles) and scored with its own tissue's head at the checkpoint's cuts in three
ways:

- A: as a user would see it, both paths from the recoloured patch;
- B: the pooled vector (the generated head) from the patch in its own colours;
- C: the spatial features from the patch in its own colours, the pooled vector
  from the recoloured one.

If B recovers the loss, the colour dependence is in the generated heads; if C does,
it is in the backbone's spatial features.

    python benchmarks/colour_path.py [--checkpoint A --checkpoint B ...] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

import numpy as np
import torch

from napari_omniseg.model import load_checkpoint, resolve_checkpoint
from napari_omniseg.model.network import fg_probability
from napari_omniseg.training.data import load_arrays, load_dataset, read_image, select
from napari_omniseg.training.loop import _pad_to
from napari_omniseg.training.metrics import dice
from stain_normalisation import _pooled, reinhard

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def _tissue_mean(rows) -> tuple[float, dict]:
    by: dict = {}
    for t, v in rows:
        by.setdefault(t, []).append(v)
    per = {t: float(np.mean(v)) for t, v in by.items()}
    return float(np.mean(list(per.values()))), per


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
    report = {}
    for cp in a.checkpoint or [None]:
        ck = load_checkpoint(resolve_checkpoint(cp))
        m = ck.model.eval()

        def feats(img):
            x = torch.from_numpy(np.ascontiguousarray(img)[None]).permute(0, 3, 1, 2)
            x, crop = _pad_to(ck.normalize(x), m.cfg.divisor)
            with torch.inference_mode():
                return m.features(x), crop

        def score(fmap, gap, crop, s):
            with torch.inference_mode():
                logits = m.heads((fmap, gap), torch.tensor([[s.tissue.id]]))[:, 0].float()
            prob = fg_probability(logits)[0, : crop[0], : crop[1]].numpy()
            return dice(prob > ck.threshold(s.tissue.name), s.mask > 0)

        own = [feats(s.image) for s in test]
        rows: dict = {}
        for name, ref in refs.items():
            for s, ((f_own, g_own), crop) in zip(test, own):
                if name == s.stain:
                    continue
                (f_new, g_new), _ = feats(reinhard(s.image, ref))
                r = rows.setdefault(name, {"own": [], "A": [], "B": [], "C": []})
                r["own"].append((s.tissue.name, score(f_own, g_own, crop, s)))
                r["A"].append((s.tissue.name, score(f_new, g_new, crop, s)))
                r["B"].append((s.tissue.name, score(f_new, g_own, crop, s)))
                r["C"].append((s.tissue.name, score(f_own, g_new, crop, s)))
        print(f"model {ck.version}: test patches recoloured into each other stain's colours (pool_norm {m.cfg.pool_norm})")
        out = {}
        for name, r in rows.items():
            v = {k: _tissue_mean(x) for k, x in r.items()}
            out[name] = {k: {"mean_dice": m_, "per_tissue": per} for k, (m_, per) in v.items()}
            unit = "/".join(f"{v[k][1].get('glomerular_unit', float('nan')):.3f}" for k in ("own", "A", "B", "C"))
            print(f"  into {name:<8} own colours {v['own'][0]:.3f}  A recoloured {v['A'][0]:.3f}  "
                  f"B head from own colours {v['B'][0]:.3f}  C features from own colours {v['C'][0]:.3f}  "
                  f"(glomerular unit own/A/B/C {unit})", flush=True)
        report[ck.version] = out
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
