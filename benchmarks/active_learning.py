"""Simulated annotation study: does the review queue's choice of what to correct teach
the model more than a random choice?  (renal demo data; the test split is not used.)

For each seed:

1. A start model is trained from scratch on a few patches per tissue of the train
   split (``--start-per-tissue``); the rest of the train split is the *pool* of
   regions a pathologist could correct.
2. Each round, ``--k`` pool patches are "corrected" (their ground truth revealed),
   chosen (a) by the review queue's score, (b) at random, and the current model is
   fine-tuned on everything corrected so far (same steps for both strategies).
3. After every round, mean foreground Dice on the validation split.

The queue's score of a patch is what the engine stores per block
(:func:`napari_omniseg.labels.review.block_scores`): the entropy of the patch's
tissue head plus its anatomy-rule violations, with every tissue of that
magnification predicted and cut at the model's calibrated thresholds. As the
queue's tissues take turns, each round takes the most uncertain pool patch of each
tissue in turn (at most ceil(k / tissues) per tissue); patches are separate images,
so the queue's spatial spread rule has nothing to act on. ``--by-score`` ranks by
score alone with at most ceil(k / 3) per tissue (the rule of the first study).

    python benchmarks/active_learning.py --seeds 0 1 2 --threads 1 --out runs/al.json \
        --png docs/images/active-learning.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

DEMO = Path(__file__).resolve().parents[2] / "shared/data/renal-demo"


def patch_scores(ck, samples) -> list[float]:
    """entropy + violation of each patch's own tissue, every tissue of its magnification predicted."""
    from napari_omniseg.inference.engine import EngineConfig, Segmenter
    from napari_omniseg.labels.review import block_scores

    seg = Segmenter(ck, EngineConfig(device="cpu"))
    out = []
    for s in samples:
        same = [t for t in ck.tissues if t.magnification == s.tissue.magnification]
        prob = seg.predict_tiles(s.image[None], [t.id for t in same])[0]
        labels = {t.name: (prob[k] > ck.threshold(t)).astype(np.uint8) for k, t in enumerate(same)}
        v = block_scores(prob, labels, same, thresholds=ck.thresholds)[s.tissue.name]
        out.append(float(v[0] + v[2]))
    return out


def pick(strategy, ck, pool, k, rng, by_score=False) -> list[int]:
    if strategy == "random":
        return sorted(rng.choice(len(pool), size=min(k, len(pool)), replace=False).tolist())
    scores = patch_scores(ck, pool)
    order = sorted(range(len(pool)), key=lambda i: -scores[i])
    if by_score:
        cap = math.ceil(k / 3)
    else:  # tissues take turns: each tissue's n-th best before any tissue's (n+1)-th
        cap = math.ceil(k / len({s.tissue.name for s in pool}))
        nth, keyed = {}, []
        for i in order:
            t = pool[i].tissue.name
            keyed.append((nth.get(t, 0), i))
            nth[t] = nth.get(t, 0) + 1
        order = [i for _n, i in sorted(keyed, key=lambda x: x[0])]
    chosen, per = [], {}
    for i in order:
        t = pool[i].tissue.name
        if per.get(t, 0) >= cap:
            continue
        chosen.append(i)
        per[t] = per.get(t, 0) + 1
        if len(chosen) == k:
            break
    return sorted(chosen)


def val_dice(ck, val) -> float:
    from napari_omniseg.training.loop import evaluate_samples

    return float(evaluate_samples(ck, val)[1]["mean_dice"])


def run_seed(seed: int, a) -> dict:
    from napari_omniseg.training.data import load_arrays, load_dataset, select
    from napari_omniseg.training.loop import TrainConfig, train

    rng = np.random.default_rng(seed)
    samples = load_dataset(a.data)
    tr = load_arrays(select(samples, "train"))
    val = load_arrays(select(samples, "val"))
    by = {}
    for i, s in enumerate(tr):
        by.setdefault(s.tissue.name, []).append(i)
    start_idx = sorted(j for idx in by.values() for j in rng.choice(idx, size=min(a.start_per_tissue, len(idx)), replace=False))
    start = [tr[i] for i in start_idx]
    pool0 = [s for i, s in enumerate(tr) if i not in set(start_idx)]
    t0 = time.perf_counter()
    ck0, _ = train(start, [], None, TrainConfig(epochs=a.start_epochs, crop=a.crop, seed=seed, threads=a.threads,
                                                 val_every=0))
    res = {"seed": seed, "n_start": len(start), "n_pool": len(pool0), "start_s": time.perf_counter() - t0,
           "start_dice": val_dice(ck0, val), "curves": {}}
    print(f"seed {seed}: start model on {len(start)} patches, val mean Dice {res['start_dice']:.3f} "
          f"({res['start_s']:.0f} s)", flush=True)
    for strategy in ("queue", "random"):
        ck, labelled, pool = ck0, list(start), list(pool0)
        srng = np.random.default_rng(seed + 1000)
        curve = [(0, res["start_dice"])]
        picked_tissues = []
        for r in range(a.rounds):
            idx = pick(strategy, ck, pool, a.k, srng, a.by_score)
            chosen = [pool[i] for i in idx]
            picked_tissues.append(sorted(s.tissue.short for s in chosen))
            labelled += chosen
            pool = [s for i, s in enumerate(pool) if i not in set(idx)]
            cfg = TrainConfig(epochs=a.ft_epochs, crop=a.crop, lr=a.ft_lr, seed=seed + r, threads=a.threads,
                              val_every=0, freeze_encoder=a.freeze_encoder)
            ck, _ = train(labelled, [], None, cfg, init=ck)
            d = val_dice(ck, val)
            curve.append((len(labelled) - len(start), d))
            print(f"  {strategy:<6} round {r + 1}: {len(labelled) - len(start):3d} corrected, val mean Dice {d:.3f} "
                  f"(picked {' '.join(picked_tissues[-1])})", flush=True)
        res["curves"][strategy] = curve
        res.setdefault("picked", {})[strategy] = picked_tissues
    return res


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    for strategy, colour in (("queue", "#d62728"), ("random", "#1f77b4")):
        curves = np.array([[d for _n, d in r["curves"][strategy]] for r in results])
        xs = [n for n, _d in results[0]["curves"][strategy]]
        for c in curves:
            ax.plot(xs, c, color=colour, alpha=0.25, lw=1)
        ax.plot(xs, curves.mean(axis=0), color=colour, lw=2.2, marker="o",
                label=f"{'review queue' if strategy == 'queue' else 'random'} (mean of {len(results)} seeds)")
    ax.set_xlabel("patches corrected")
    ax.set_ylabel("validation mean Dice")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEMO))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--start-per-tissue", type=int, default=2)
    p.add_argument("--start-epochs", type=int, default=60)
    p.add_argument("--k", type=int, default=6, help="patches corrected per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ft-epochs", type=int, default=15)
    p.add_argument("--ft-lr", type=float, default=5e-4)
    p.add_argument("--freeze-encoder", action="store_true", help="as the Fine-tune widget's default")
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--by-score", action="store_true", help="the first study's rule: score order, ceil(k / 3) per tissue")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    p.add_argument("--png")
    p.add_argument("--merge", nargs="*", default=[], help="JSON results of other runs to add to the plot")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    results = [run_seed(s, a) for s in a.seeds]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"args": vars(a), "results": results}, indent=1))
    for m in a.merge:
        results += json.loads(Path(m).read_text())["results"]
    for strategy in ("queue", "random"):
        curves = np.array([[d for _n, d in r["curves"][strategy]] for r in results])
        print(strategy, "mean over seeds:", " ".join(f"{v:.3f}" for v in curves.mean(axis=0)))
    if a.png:
        plot(results, Path(a.png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
