"""Omni-Seg against the paper's baselines, trained the same way on the same data.

Trains, for each seed, the four methods with one TrainConfig (epochs, crop, batch,
optimiser, learning-rate schedule, augmentation, seed) on the train split, selects
on the val split, and scores the test split: per-tissue foreground Dice, HD95 and
mean surface distance in microns at each tissue's pixel size.

- ``omniseg``: :func:`napari_omniseg.training.loop.train` (the shipped method);
- ``multi_network``, ``multihead_tal``, ``multiclass``: see
  :mod:`napari_omniseg.training.baselines`.

Also measured: parameter count, training wall time, and inference time per
256x256 tile for ALL tissues (multi-network: six forwards; Omni-Seg: one backbone
pass plus six dynamic heads; the single-network baselines: one forward), timed on
a batch of test tiles after one warm-up pass (median of ``--infer-repeats``).

Rules, the same for every method: the epoch of best mean validation Dice is kept
(``--selection own`` instead keeps each of the multi-network's networks at its own
tissue's best, the rule that favours it); masks are cut at 0.5 (or by argmax), and with
``--calibrate`` each trained model is scored a second time with per-tissue thresholds
chosen on the train + validation patches (the same grid and rule for every method; the
multi-class argmax has none).

Writes a markdown report (``--out-md``) and every per-image score and training
history as JSON (``--out-json``), and prints the tables.  ``--rerender JSON``
rewrites the markdown from a saved JSON without training again.

    python benchmarks/compare_methods.py --data ../shared/data/renal-demo \
        --epochs 30 --crop 128 --threads 2 --out-md docs/comparison.md --out-json runs/comparison.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from napari_omniseg.model.network import count_parameters, foreground
from napari_omniseg.tissues import TISSUES
from napari_omniseg.training.baselines import BASELINES, calibrate_baseline, evaluate_baseline, train_baseline
from napari_omniseg.training.data import load_arrays, load_dataset, select
from napari_omniseg.training.loop import TrainConfig, cpu_has_fast_bf16, evaluate_samples, train

METHODS = ("omniseg", "multi_network", "multihead_tal", "multiclass")
LABELS = {
    "omniseg": "Omni-Seg (one backbone, dynamic heads)",
    "multi_network": "Multi-network (6 binary U-Nets)",
    "multihead_tal": "Multi-head + TAL",
    "multiclass": "Multi-class softmax",
}


# --------------------------------------------------------------------------- machine
def cpu_model() -> str:
    name = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return name or platform.machine()


def machine() -> str:
    dev = f"{torch.cuda.get_device_name(0)} (CUDA), " if torch.cuda.is_available() else ""
    return (f"{dev}CPU {cpu_model()} ({platform.machine()}), {os.cpu_count()} logical cores, "
            f"{torch.get_num_threads()} torch threads, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}, training in "
            f"{'bf16 autocast' if cpu_has_fast_bf16() else 'fp32'}")  # runs train on the CPU


def split_machine(m: str) -> tuple[str, str | None]:
    """(the machine, its training precision or None where the run did not record it)."""
    base, sep, prec = m.rpartition(", training in ")
    return (base, prec) if sep else (m, None)


# --------------------------------------------------------------------------- timing
def all_tissue_fn(method: str, model):
    """x (N x 3 x H x W in [0, 1]) -> bool N x T x H x W masks of every tissue."""
    if method == "omniseg":
        n_t = model.cfg.n_tissues
        return lambda x: foreground(model.heads(model.features(x), list(range(n_t))))
    b = BASELINES[method]
    return lambda x: b.predict_all(model, x)


@torch.inference_mode()
def time_per_tile_ms(fn, x: torch.Tensor, repeats: int) -> float:
    """Median wall time of ``fn(x)`` over ``repeats`` runs after one warm-up, per tile, in ms."""
    out = fn(x)
    assert out.shape[:2] == (x.shape[0], len(TISSUES)), out.shape
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times) / x.shape[0]


def _load1() -> float:
    """1-minute load average (NaN where the OS has none): other work slows the timings."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


# --------------------------------------------------------------------------- one run
def run_one(method: str, seed: int, tr, va, te, a) -> list[dict]:
    """Train ``method`` once and score the test split: one record with every mask cut at
    0.5 (or by argmax), and with ``--calibrate`` a second one for the same networks with
    each tissue's threshold calibrated on the train + validation patches."""
    cfg = TrainConfig(epochs=a.epochs, crop=a.crop, batch_size=a.batch_size, optimizer=a.optimizer, lr=a.lr,
                      seed=seed, threads=a.threads, val_every=a.val_every, device="cpu",
                      # every method on the same data stream: the baselines read it through the loop's
                      # reference batch builder, so the anatomy-derived labels, object crops and balanced
                      # steps of the current recipe stay off here (the comparison is like for like)
                      relations=False, balanced=False, object_crop=0.0,
                      # thresholds: calibrated below for every method alike, or not at all
                      calibrate=a.calibrate, head_channels=a.head_channels)

    def prog(ev):
        if ev.get("phase") == "epoch":
            v = ev.get("val_mean_dice")
            print(f"  [{method} seed {seed}] epoch {ev['epoch']:3d}/{ev['epochs']}  loss {ev['loss']:.4f}  "
                  f"val mean Dice {'-' if v is None else f'{v:.3f}'}  {ev['time_s']:.0f} s", flush=True)

    load0 = _load1()
    t0 = time.perf_counter()
    scored = []  # (thresholds, rows, summary)
    if method == "omniseg":
        ck, hist = train(tr, va, None, cfg, on_progress=prog)
        train_s = time.perf_counter() - t0
        model = ck.model.eval()
        scored.append((None, *evaluate_samples(dataclasses.replace(ck, thresholds={}), te)))
        if a.calibrate:
            scored.append((dict(ck.thresholds), *evaluate_samples(ck, te)))
    else:
        model, hist = train_baseline(method, tr, va, cfg, on_progress=prog,
                                     per_tissue_selection=None if a.selection == "own" else False)
        train_s = time.perf_counter() - t0
        scored.append((None, *evaluate_baseline(method, model, te)))
        if a.calibrate and BASELINES[method].has_probability:  # not the multi-class argmax
            th = calibrate_baseline(method, model, list(tr) + list(va))
            scored.append((th, *evaluate_baseline(method, model, te, thresholds=th)))
    x = torch.from_numpy(np.stack([s.image for s in te[: a.infer_batch]])).permute(0, 3, 1, 2).float() / 255.0
    infer_ms = time_per_tile_ms(all_tissue_fn(method, model), x, a.infer_repeats)
    out = []
    for th, rows, summ in scored:
        out.append({"method": method, "seed": seed, "n_parameters": count_parameters(model), "train_s": train_s,
                    "load_1min": [load0, _load1()],
                    "infer_ms_per_tile": infer_ms, "infer_batch": int(x.shape[0]), "infer_tile": list(x.shape[-2:]),
                    "summary": summ, "rows": rows,
                    # calibrated: thresholds chosen for this record (some tissues may keep 0.5)
                    "history": {**hist, "thresholds": th or {}, "calibrated": th is not None}})
    return out


# --------------------------------------------------------------------------- report
def _stat(vals, decimals, scale=1.0):
    vals = [v * scale for v in vals if v is not None and not math.isnan(v)]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.{decimals}f}"
    return f"{statistics.mean(vals):.{decimals}f} ± {statistics.stdev(vals):.{decimals}f}"


OWN = "multi_network_own"
CAL = "omniseg_calibrated"
#: table rows: each method, the multi-network once more where it was selected per tissue,
#: and each once more where its thresholds were calibrated (suffix "_calibrated")
ROWS = tuple(r for m in METHODS for r in ((m, f"{m}_calibrated", OWN, f"{OWN}_calibrated")
                                          if m == "multi_network" else (m, f"{m}_calibrated")))
LABELS[OWN] = "Multi-network, each network at its own tissue's best epoch"
for _m in list(LABELS):
    LABELS[f"{_m}_calibrated"] = f"{LABELS[_m]}, thresholds calibrated on train + validation patches"


def row_of(r: dict) -> str:
    """The table row of a run: its method, or OWN for a multi-network whose networks were
    each kept at their own tissue's best epoch (its history says so; runs saved before
    ``--selection`` existed were all selected that way); "_calibrated" appended where the
    run's thresholds were calibrated (``--calibrate``, and Omni-Seg runs saved before the
    comparison switched its calibration off)."""
    row = r["method"]
    if row == "multi_network" and set(r["history"].get("best_epoch", {})) - {"all"}:
        row = OWN
    cal = r["history"].get("calibrated")
    if cal is None:  # runs saved before the flag: calibrated where a threshold is not 0.5
        cal = any(v != 0.5 for v in (r["history"].get("thresholds") or {}).values())
    if cal:
        row += "_calibrated"
    return row


def tables(runs: list[dict], tissues) -> tuple[str, str, str]:
    by_m: dict[str, list[dict]] = {}
    for r in runs:
        by_m.setdefault(row_of(r), []).append(r)
    short = [t.short.upper() for t in tissues]
    head = (["method", "runs", *[f"{s} Dice" for s in short], "mean Dice", "mean HD95 (um)", "mean MSD (um)",
             "test images without a distance", "params", "train time (s)", "inference (ms/tile, all tissues)"])
    t1 = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    t2h = ["method", "runs", *[f"{s} HD95 / MSD (um)" for s in short]]
    t2 = ["| " + " | ".join(t2h) + " |", "|---|" + "---:|" * (len(t2h) - 1)]
    t3h = ["method", *[f"{s}" for s in short], "total"]
    t3 = ["| " + " | ".join(t3h) + " |", "|---|" + "---:|" * (len(t3h) - 1)]
    for m in [m for m in ROWS if m in by_m]:
        rs = by_m[m]
        pt = lambda t, k: [r["summary"]["per_tissue"].get(t.name, {}).get(k, float("nan")) for r in rs]  # noqa: E731
        cells = [LABELS[m], str(len(rs))]
        cells += [_stat(pt(t, "dice"), 3) for t in tissues]
        cells += [_stat([r["summary"]["mean_dice"] for r in rs], 3),
                  _stat([r["summary"]["mean_hd95_um"] for r in rs], 1),
                  _stat([r["summary"]["mean_msd_um"] for r in rs], 1),
                  _stat([sum(v["n_undefined_distance"] for v in r["summary"]["per_tissue"].values()) for r in rs], 0),
                  f"{rs[0]['n_parameters']:,}",
                  _stat([r["train_s"] for r in rs], 0),
                  _stat([r["infer_ms_per_tile"] for r in rs], 1)]
        t1.append("| " + " | ".join(cells) + " |")
        c2 = [LABELS[m], str(len(rs))] + [f"{_stat(pt(t, 'hd95_um'), 1)} / {_stat(pt(t, 'msd_um'), 1)}" for t in tissues]
        t2.append("| " + " | ".join(c2) + " |")
        und = [sum(r["summary"]["per_tissue"].get(t.name, {}).get("n_undefined_distance", 0) for r in rs) for t in tissues]
        t3.append("| " + " | ".join([LABELS[m], *map(str, und), str(sum(und))]) + " |")
    return "\n".join(t1), "\n".join(t2), "\n".join(t3)


def report(runs, tissues, a, command, mach, counts, started, load) -> str:
    """``command``, ``started``, ``load`` are strings for one run, or lists for merged runs."""
    commands = [command] if isinstance(command, str) else list(command)
    starts = [started] if isinstance(started, str) else list(started)
    loads0 = [load] if isinstance(load, str) else list(load)
    if len(commands) == 1:
        origin = (f"every figure below comes from the one\nrun of the command shown here. Started {starts[0]}.")
        loadline = f"Load average (1, 5, 15 min) when the run started: {loads0[0]}."
    else:
        origin = ("every figure below comes from the runs\nof the commands shown here (same settings; they differ only "
                  "in the seeds or the methods they ran), merged by `--rerender` with one JSON per command. Started "
                  + "; ".join(starts) + ".")
        loadline = "Load average (1, 5, 15 min) when each command started: " + "; ".join(loads0) + "."
    t1, t2, t3 = tables(runs, tissues)
    seeds = sorted({r["seed"] for r in runs})
    n_test = ", ".join(f"{t.short.upper()} {counts['test'].get(t.name, 0)}" for t in tissues)
    infer = runs[0]
    loads = "; ".join(f"{LABELS[r['method']]} (seed {r['seed']}) {r['load_1min'][0]:.1f} -> {r['load_1min'][1]:.1f}"
                      for r in runs)
    # the rule each run was selected by, from its history (runs saved before the option
    # existed kept the multi-network's networks at their own tissue's best epoch)
    rows = {row_of(r) for r in runs}
    own, mean = OWN in rows, "multi_network" in rows
    if own and not mean:
        selection = ("the epoch of best mean validation Dice kept (for the multi-network, each tissue's network at "
                     "its own tissue's best validation Dice: a rule that favours it)")
        mn_selection = "each network selected on its own tissue's validation Dice"
    else:
        selection = ("the epoch of best mean validation Dice kept, the same rule for every method (the "
                     "multi-network's six networks kept together)"
                     + ("; the multi-network also with each tissue's network at its own tissue's best "
                        "validation Dice, a rule that favours it, in a row of its own" if own else ""))
        mn_selection = ("the six networks are selected together, on mean validation Dice"
                        + (" (in the row marked so, each on its own tissue's validation Dice)" if own else ""))
    calibrated = {k for k in rows if k.endswith("_calibrated")}
    if not calibrated:
        cut = "every method's masks cut at 0.5 (or by argmax), no calibrated thresholds"
    elif calibrated == {CAL}:
        cut = ("every method's masks cut at 0.5 (or by argmax); Omni-Seg also with thresholds calibrated at the end "
               "of training on the train + validation patches, in a row of its own (an advantage the baselines "
               "do not get)")
    else:
        cut = ("rows marked calibrated: each tissue's threshold chosen after training on the train + validation "
               "patches, the same grid and rule for every method (the multi-class argmax has none); other rows cut "
               "at 0.5 (or by argmax)")
    return f"""# Omni-Seg against the paper's baselines (renal demo data)

Generated by `benchmarks/compare_methods.py`; {origin}

```
{chr(10).join(commands)}
```

**Machine:** {mach}. {loadline}
Times are wall-clock on that machine with the thread count above. Other jobs may
share the machine (a load above the thread count means they did); the 1-minute load
average at the start and end of each method's training and testing was: {loads}. Training and inference times are only
comparable between methods run under similar load.

**Data:** `{a.data}` with its `splits.csv`: train {counts['n_train']} patches, validation
{counts['n_val']} (model selection), test {counts['n_test']} (scored; per tissue: {n_test}).
Each patch is labelled for one tissue only.

**Budget, identical for every method:** {a.epochs} epochs, random crops of {a.crop} px,
batch {a.batch_size} (tissue-homogeneous batches), {a.optimizer} lr {a.lr} with poly decay
(power 0.9), the package's augmentation (`training/augment.py`) and boundary ring weight,
uniform random crops and one pass over the patches per epoch with only the labelled tissue
supervised (the package's anatomy-derived labels, object crops and tissue-balanced steps
are off for every method: the baselines read the same reference data stream),
validation every {a.val_every} epochs with {selection}; {cut}; seed(s)
{", ".join(map(str, seeds))}. For a given seed the batches, crops and augmentations are the
same pixels in the same order for every method, and the networks start from the
same random-number state. Runs per figure: the `runs` column
(one per seed; with more than one, figures are mean ± sample standard deviation).
"Test images without a distance": images where exactly one of prediction and ground
truth is empty, left out of the HD95/MSD means (see below).

## Test split, Table-1 style

Per-tissue foreground Dice; means are unweighted over the six tissues. HD95 and MSD
are in microns at each tissue's pixel size (DT, PT, VES 1.0, CAP, TUFT 2.0, PTC 0.25
um/px). Inference: time to produce the masks of all six tissues for one
{infer['infer_tile'][0]}x{infer['infer_tile'][1]} tile, median of {a.infer_repeats} timed
passes over a batch of {infer['infer_batch']} test tiles after one warm-up pass.

{t1}

## Per-tissue HD95 / MSD (um), test split

{t2}

Test images whose prediction is empty while the ground truth is not (or the reverse)
have no surface distance; they are left out of the HD95/MSD means above (their Dice,
0, is counted). Their number per tissue, summed over runs:

{t3}

A tissue where every test image lacks a distance drops out of a method's mean HD95 and
MSD, so those means cover different tissues for different methods: compare distances
per tissue (table above), and only where both methods have them.

## What each method is

All four share the residual U-Net backbone (`model/network.py`, 8-channel decoder
output); only the output part and the loss differ.

- **Omni-Seg**: `training.loop.train`, the package's method: one backbone, a
  controller producing a per-(tissue, scale) dynamic head 8-8-8-2; Dice + BCE on the
  labelled tissue's head. Foreground where logit 1 > logit 0.
- **Multi-network**: six binary U-Nets (backbone + 1x1 conv 8->2), network c trained
  only on the batches labelled for tissue c with the same Dice + BCE loss; {mn_selection}.
  Prediction for c: network c, logit 1 > logit 0. Inference for all tissues = six forwards.
- **Multi-head + TAL** (Fang & Yan 2020): backbone + 1x1 conv 8->7, softmax over
  background + six tissues. On an image labelled for c, background and the other
  tissues are merged into "not c"; loss = binary cross-entropy of p_c (ring weighted)
  + the same soft Dice on (1 - p_c, p_c) as Omni-Seg's loss. Prediction for c:
  p_c > 0.5 (the merged binary decision).
- **Multi-class softmax** (Gonzalez et al. 2018): the same 8->7 network; on an image
  labelled for c the target is c on the mask and background everywhere else
  (unlabelled tissues become background); loss = ring-weighted softmax cross-entropy
  + the same soft Dice on p_c. Prediction for c: argmax = c.

A softmax gives each pixel one class, so the two single-network baselines cannot
label a pixel both glomerular unit and glomerular tuft, although the tuft lies
inside the unit.

## Limits of this comparison

- A small demo set (a few dozen training patches, a handful of test patches per
  tissue) and a short CPU budget: differences of a few Dice points between methods
  are within what another seed or split could change. The paper trained on about
  150,000 patches; this run is not a reproduction of its Table 1.
- Timing shares the machine with whatever else ran at the time (see the load
  average above).

Per-image scores and training histories: `{a.out_json or '(not written)'}`.
"""


_PER_COMMAND = ("seed", "seeds", "methods", "selection", "calibrate", "out_md", "out_json", "rerender")


def rerender(p: argparse.ArgumentParser, paths: list[str]) -> str:
    """The report of one or more saved runs; refuses to merge runs made with different settings."""
    saved = [json.loads(Path(x).read_text()) for x in paths]
    olds = []
    for path, sv in zip(paths, saved):
        o = p.parse_args(shlex.split(sv["command"])[2:])
        o.out_json = o.out_json or path
        olds.append(o)
    ref = {k: v for k, v in vars(olds[0]).items() if k not in _PER_COMMAND}
    for path, o, sv in zip(paths[1:], olds[1:], saved[1:]):
        diff = {k: (ref[k], v) for k, v in vars(o).items() if k not in _PER_COMMAND and ref.get(k) != v}
        if diff:
            raise SystemExit(f"{path}: settings differ from {paths[0]}: {diff}; such runs cannot share a table")
        (m0, p0), (m1, p1) = split_machine(saved[0]["machine"]), split_machine(sv["machine"])
        if m1 != m0 or (p0 and p1 and p0 != p1) or sv["counts"] != saved[0]["counts"]:
            raise SystemExit(f"{path}: another machine or data split than {paths[0]}; such runs cannot share a table")
    runs, seen = [], set()
    for path, sv in zip(paths, saved):
        for r in sv["runs"]:
            key = (row_of(r), r["seed"])
            if key in seen:
                raise SystemExit(f"{path}: {r['method']} seed {r['seed']} is already in an earlier file")
            seen.add(key)
            runs.append(r)
    a = olds[0]
    if len(paths) > 1:
        a.out_json = ", ".join(o.out_json for o in olds)
    known = [split_machine(sv["machine"]) for sv in saved if split_machine(sv["machine"])[1]]
    mach = (f"{known[0][0]}, training in {known[0][1]}" if known else saved[0]["machine"])
    return report(runs, TISSUES, a, [sv["command"] for sv in saved], mach, saved[0]["counts"],
                  [sv["started"] for sv in saved], [sv["load_average"] for sv in saved])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/renal-demo"))
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--optimizer", default="adamw")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--val-every", type=int, default=5)
    p.add_argument("--seeds", type=int, default=1, help="number of seeds (seed, seed+1, ...)")
    p.add_argument("--seed", type=int, default=1234, help="first seed")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--selection", choices=("mean", "own"), default="mean",
                   help="mean: every method kept at its epoch of best mean validation Dice (the multi-network's "
                        "six networks together); own: the multi-network's networks each at their own tissue's best")
    p.add_argument("--calibrate", action="store_true",
                   help="every method's per-tissue thresholds chosen on the train + validation patches after "
                        "training (as `omniseg train` does for Omni-Seg; the multi-class argmax has none)")
    p.add_argument("--head-channels", type=int, default=8,
                   help="decoder output channels every method's head reads (Omni-Seg's generated heads, the "
                        "baselines' 1x1 heads); 8 as the reference")
    p.add_argument("--infer-batch", type=int, default=8)
    p.add_argument("--infer-repeats", type=int, default=3)
    p.add_argument("--out-md", default="docs/comparison.md")
    p.add_argument("--out-json", default="")
    p.add_argument("--rerender", metavar="JSON", nargs="+",
                   help="rewrite --out-md from the JSON of earlier runs (no training). Several JSON files are "
                        "merged into one table; their commands must differ only in --seed/--seeds/--methods/--out-*, "
                        "their seeds must not overlap and they must come from the same machine")
    a = p.parse_args(argv)
    if a.rerender:
        text = rerender(p, a.rerender)
        Path(a.out_md).write_text(text)
        print(text)
        return 0
    methods = [m for m in a.methods.split(",") if m]
    bad = set(methods) - set(METHODS)
    if bad:
        p.error(f"unknown methods {sorted(bad)}; choose from {METHODS}")
    if a.threads:
        torch.set_num_threads(a.threads)
    command = shlex.join(["python", "benchmarks/compare_methods.py", *(sys.argv[1:] if argv is None else argv)])
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    mach = machine()

    samples = load_dataset(a.data)
    tr = load_arrays(select(samples, "train"))
    va = load_arrays(select(samples, "val"))
    te = load_arrays(select(samples, "test"))
    counts = {"n_train": len(tr), "n_val": len(va), "n_test": len(te), "test": {}}
    for s in te:
        counts["test"][s.tissue.name] = counts["test"].get(s.tissue.name, 0) + 1
    print(f"{command}\n{mach}\ntrain {len(tr)}, val {len(va)}, test {len(te)} patches", flush=True)

    runs = []
    for k in range(a.seeds):
        for m in methods:
            for r in run_one(m, a.seed + k, tr, va, te, a):
                runs.append(r)
                how = "calibrated" if r["history"]["calibrated"] else "cut at 0.5"
                print(f"{m} seed {a.seed + k} ({how}): test mean Dice {r['summary']['mean_dice']:.3f}, "
                      f"train {r['train_s']:.0f} s, {r['infer_ms_per_tile']:.1f} ms/tile", flush=True)
            if a.out_json:  # after every run, so a long comparison keeps what it finished
                Path(a.out_json).parent.mkdir(parents=True, exist_ok=True)
                Path(a.out_json).write_text(json.dumps({"command": command, "machine": mach, "started": started,
                                                        "load_average": load, "counts": counts, "runs": runs},
                                                       indent=1, default=str))
    t1, t2, t3 = tables(runs, TISSUES)
    print("\n" + t1 + "\n\n" + t2 + "\n\n" + t3)
    if a.out_md:
        Path(a.out_md).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out_md).write_text(report(runs, TISSUES, a, command, mach, counts, started, load))
        print(f"\nwrote {a.out_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
