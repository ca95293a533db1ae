"""Leave-one-stain-out on the renal demo: how does the model do on a stain it never saw?

For each stain S of the four (he, pas, sil, tri) a model is trained on the train
split without S (``train_demo.py --stains``, same recipe and budget as the run it is
compared with), and the whole test split is scored.  The report compares, per stain,
the held-out model with a model trained on all four stains (``--all-stains CKPT``),
both on S's val + test patches: all of them unseen by the held-out model, and only
used for epoch selection by the all-stain one.
Tissues the held-out model never saw (the capillary exists in PAS only) are left out
of that stain's mean.

    python benchmarks/leave_one_stain_out.py --run --epochs 30 --out-dir runs/loso   # trains 4 + 1 models
    python benchmarks/leave_one_stain_out.py --out-dir runs/loso --all-stains runs/p30-new.safetensors --report docs/x.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

STAINS = ("he", "pas", "sil", "tri")
HERE = Path(__file__).resolve().parent


def _per_tissue(rows, stain, tissues=None):
    out = {}
    for r in rows:
        if r["stain"] != stain or (tissues is not None and r["tissue"] not in tissues):
            continue
        out.setdefault(r["tissue"], []).append(r["dice"])
    return {t: float(np.mean(v)) for t, v in out.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="store_true",
                   help="train the four held-out models first, and the all-stain model unless --all-stains names one")
    p.add_argument("--out-dir", default="runs/loso")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--data")
    p.add_argument("--all-stains", help="checkpoint of a model trained on all stains with the same recipe and budget")
    p.add_argument("--report")
    p.add_argument("--split", default="val+test",
                   help="patches scored (default val+test); 'test' leaves out the validation patches, which the "
                        "all-stain model used to select its epoch and calibrate its cuts")
    p.add_argument("--normalise", action="store_true",
                   help="also score the held-out model on the held-out stain after Reinhard colour normalisation "
                        "to the tissue pixels of the train patches it was trained on (stain_normalisation.py)")
    a, extra = p.parse_known_args(argv)
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if a.run:
        for s in STAINS:
            ck = out / f"without-{s}.safetensors"
            if ck.with_suffix(".eval.json").exists():
                continue
            cmd = [sys.executable, str(HERE / "train_demo.py"), "--epochs", str(a.epochs), "--threads", str(a.threads),
                   "--seed", str(a.seed), "--val-every", "5", "--stains", ",".join(x for x in STAINS if x != s),
                   "--out", str(ck), *(["--data", a.data] if a.data else []), *extra]
            print(" ".join(cmd), flush=True)
            with open(out / f"without-{s}.log", "w") as log:
                subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
        if not a.all_stains:  # the reference: the same command on all four stains
            ck = out / "all-stains.safetensors"
            if not ck.with_suffix(".eval.json").exists():
                cmd = [sys.executable, str(HERE / "train_demo.py"), "--epochs", str(a.epochs), "--threads", str(a.threads),
                       "--seed", str(a.seed), "--val-every", "5", "--out", str(ck),
                       *(["--data", a.data] if a.data else []), *extra]
                print(" ".join(cmd), flush=True)
                with open(out / "all-stains.log", "w") as log:
                    subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
            a.all_stains = str(ck)
    from napari_omniseg.model import load_checkpoint
    from napari_omniseg.training.data import load_arrays, load_dataset, select
    from napari_omniseg.training.loop import evaluate_samples

    data = a.data or str(HERE.parents[1] / "shared/data/renal-demo")
    everything = load_dataset(data)
    unseen = load_arrays(select(everything, a.split))  # never trained on by either model
    ref = load_checkpoint(a.all_stains) if a.all_stains else None
    norm_col = " held-out model, normalised | gap |" if a.normalise else ""
    lines = ["| held-out stain | tissues scored | patches | all-stain model | held-out model | gap |" + norm_col,
             "|---|---|---:|---:|---:|---:|" + ("---:|---:|" if a.normalise else "")]
    per_tissue_lines = []
    control_lines = []
    result = {}
    for s in STAINS:
        ev = out / f"without-{s}.eval.json"
        if not ev.exists():
            continue
        trained_on = set(json.loads(ev.read_text()).get("trained_tissues", []))
        group = [x for x in unseen if x.stain == s and x.tissue.name in trained_on]
        if not group:
            continue
        held_ck = load_checkpoint(out / f"without-{s}.safetensors")
        _, held = evaluate_samples(held_ck, group)
        normed = None
        if a.normalise:
            import copy

            from stain_normalisation import _pooled, reinhard

            seen = load_arrays([x for x in select(everything, "train") if x.stain != s])
            ref_stats = _pooled([x.image for x in seen])
            ngroup = []
            for x in group:
                y = copy.copy(x)
                y.image = reinhard(x.image, ref_stats)
                ngroup.append(y)
            normed = evaluate_samples(held_ck, ngroup)[1]
        allm = evaluate_samples(ref, group)[1] if ref else None
        hm = held["mean_dice"]
        am = allm["mean_dice"] if allm else float("nan")
        result[s] = {"patches": len(group), "held_out": held["per_tissue"], "all_stains": allm and allm["per_tissue"],
                     "held_out_mean": hm, "all_stains_mean": am}
        row = f"| {s} | {', '.join(sorted(held['per_tissue']))} | {len(group)} | {am:.3f} | {hm:.3f} | {hm - am:+.3f} |"
        if normed:
            nm = normed["mean_dice"]
            result[s].update(held_out_normalised=normed["per_tissue"], held_out_normalised_mean=nm)
            row += f" {nm:.3f} | {nm - am:+.3f} |"
        lines.append(row)
        # control: the same two models on the stains the held-out model did train on; the held-out
        # model saw fewer patches, so part of its gap is less data, not the unseen stain
        seen_group = [x for x in unseen if x.stain != s and x.tissue.name in trained_on]
        if ref and seen_group:
            hs = evaluate_samples(held_ck, seen_group)[1]["mean_dice"]
            als = evaluate_samples(ref, seen_group)[1]["mean_dice"]
            result[s].update(seen_stains_held_out_mean=hs, seen_stains_all_stains_mean=als)
            control_lines.append(f"| {s} | {len(seen_group)} | {als:.3f} | {hs:.3f} | {hs - als:+.3f} | "
                                 f"{(hm - am) - (hs - als):+.3f} |")
        for t in sorted(held["per_tissue"]):
            av = allm["per_tissue"][t]["dice"] if allm else float("nan")
            cell = f" {normed['per_tissue'][t]['dice']:.3f} |" if normed else ""
            per_tissue_lines.append(f"| {s} | {t} | {held['per_tissue'][t]['n']} | {av:.3f} | {held['per_tissue'][t]['dice']:.3f} |{cell}")
    what = ("the val + test patches of each stain (neither model trained on them; the all-stain model selected its "
            "epoch and calibrated its cuts on the val patches)") if a.split == "val+test" else f"the {a.split} patches of each stain"
    text = (f"Scored on {what}.\n\n" + "\n".join(lines)
            + "\n\nPer tissue:\n\n| stain | tissue | n | all-stain model | held-out model |"
            + (" normalised |" if a.normalise else "") + "\n|---|---|---:|---:|---:|" + ("---:|" if a.normalise else "") + "\n"
            + "\n".join(per_tissue_lines) + "\n")
    if control_lines:
        text += ("\nControl, the same two models on the stains the held-out model was trained on (same split); "
                 "'stain effect' is the gap on the held-out stain minus this gap:\n\n"
                 "| held-out stain | patches of the other stains | all-stain model | held-out model | gap | stain effect |\n"
                 "|---|---:|---:|---:|---:|---:|\n" + "\n".join(control_lines) + "\n")
    print(text)
    (out / ("loso.json" if a.split == "val+test" and not a.normalise else f"loso-{a.split}{'-norm' if a.normalise else ''}.json")).write_text(json.dumps(result, indent=2, default=float))
    if a.report:
        Path(a.report).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
