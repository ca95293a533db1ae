"""Does colour normalisation at inference help the model on other stains and labs?

Reinhard normalisation: every image's tissue pixels (darkest channel below 215) are
moved in CIELAB to the mean and standard deviation of a reference, here the tissue
pixels of the demo's train + validation patches (all stains pooled, or PAS only).
Scored with a checkpoint (default: the shipped model) on

- the demo test split (23 patches, each with its own tissue's head), mean and per tissue;
- the AIDPATH tiles through the whole-slide engine (default settings, 0.5 um/px):
  glomerular-unit Dice over all tiles and over the tiles ``train_demo.py
  --hold-out-every 3`` keeps out of training.

    python benchmarks/stain_normalisation.py [--checkpoint C] [--threads 2]

Prints one line per variant (none, pooled reference, PAS reference).
"""

from __future__ import annotations

import argparse
import copy
import glob
import warnings
from pathlib import Path

import numpy as np
import torch
from skimage.color import lab2rgb, rgb2lab

from napari_omniseg.inference.engine import EngineConfig, Segmenter, segment_region
from napari_omniseg.model import load_checkpoint, resolve_checkpoint
from napari_omniseg.slides import ImageSlide
from napari_omniseg.tissues import TISSUES
from napari_omniseg.training.data import load_arrays, load_dataset, read_image, read_mask, select
from napari_omniseg.training.loop import evaluate_samples

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def _tissue(rgb: np.ndarray) -> np.ndarray:
    return rgb.min(-1) < 215


def _pooled(images) -> tuple[np.ndarray, np.ndarray]:
    lab = np.concatenate([rgb2lab(im)[_tissue(im)] for im in images])
    return lab.mean(0), lab.std(0)


def reinhard(rgb: np.ndarray, ref: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    m = _tissue(rgb)
    lab = rgb2lab(rgb)
    px = lab[m] if m.sum() > 100 else lab.reshape(-1, 3)
    mu, sd = px.mean(0), px.std(0) + 1e-6
    out = np.where(m[..., None], (lab - mu) / sd * ref[1] + ref[0], lab)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return (np.clip(lab2rgb(out), 0, 1) * 255 + 0.5).astype(np.uint8)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint")
    p.add_argument("--demo", default=str(SHARED / "renal-demo"))
    p.add_argument("--aidpath", default=str(SHARED / "aidpath-glomeruli"))
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    ck = load_checkpoint(resolve_checkpoint(a.checkpoint))
    samples = load_dataset(a.demo)
    train = load_arrays(select(samples, ["train", "val"]))
    test = load_arrays(select(samples, "test"))
    refs = {"pooled": _pooled([s.image for s in train]),
            "pas": _pooled([s.image for s in train if s.stain == "pas"])}
    seg = Segmenter(ck, EngineConfig(device="cpu", threads=a.threads))
    names = sorted(glob.glob(str(Path(a.aidpath) / "images" / "*.png")))
    print(f"model {ck.version}; test split {len(test)} patches; AIDPATH {len(names)} tiles")
    for variant in ("none", "pooled", "pas"):
        fn = (lambda x: x) if variant == "none" else (lambda x, r=refs[variant]: reinhard(x, r))
        moved = []
        for s in test:
            c = copy.copy(s)
            c.image = fn(s.image)
            moved.append(c)
        _, summ = evaluate_samples(ck, moved)
        short = {t.name: t.short for t in TISSUES}
        per = " ".join(f"{short.get(t, t)} {v['dice']:.3f}" for t, v in sorted(summ["per_tissue"].items()))
        dice = []
        for i, n in enumerate(names):
            img = fn(read_image(n))
            gt = read_mask(n.replace(f"{Path(n).parent.name}", "masks"))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res, _ = segment_region(seg, ImageSlide(img, mpp=0.5), None, ["glomerular_unit"])
            lab = res["glomerular_unit"]
            f = lab.factor
            ys = np.minimum((np.arange(gt.shape[0]) / f).astype(int) - lab.origin[0], lab.data.shape[0] - 1)
            xs = np.minimum((np.arange(gt.shape[1]) / f).astype(int) - lab.origin[1], lab.data.shape[1] - 1)
            pr = lab.data[np.ix_(ys, xs)] == 1
            dice.append((i % 3 == 2, 2 * (pr & gt).sum() / max(1, pr.sum() + gt.sum())))
        d = np.array(dice, float)
        print(f"{variant:<7} test mean {summ['mean_dice']:.3f} ({per}) | AIDPATH unit all {d[:, 1].mean():.3f}, "
              f"held-out {d[d[:, 0] == 1, 1].mean():.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
