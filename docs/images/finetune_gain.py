"""What a fine-tune on corrections costs and gains, measured with the core the widgets call.

Protocol (the numbers in docs/user-guide.md, section 6):

- model: a checkpoint trained on the demo *train* split only (the val split must be
  unseen, because its patches serve as corrections): the path given as the first
  argument, e.g. the selection run of docs/training-results.md
  (``runs/demo-train.safetensors``); the shipped model, trained on train+val, is
  refused;
- corrections: the 10x patches of every other image of the demo *test* split plus
  all 10x patches of the *val* split. For each, the region is segmented with the
  model, the tissue the patch was annotated for is replaced by its annotation (what
  a pathologist would paint), marked reviewed and committed; then everything is
  exported as 128 px patches (about 20% held out);
- fine-tune: :func:`napari_omniseg.corrections.finetune.finetune`, the Fine-tune
  widget's CPU defaults, and variants;
- evaluation: mean foreground Dice on the held-out exported patches (what the
  widget shows) and on the *other* test images, which were never corrected
  (generalisation).

    OMP_NUM_THREADS=2 python docs/images/finetune_gain.py runs/demo-train.safetensors
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> int:
    os.environ["OMNISEG_HOME"] = tempfile.mkdtemp(prefix="omniseg-gain-")
    from napari_omniseg._sample_data import build_renal_mosaic
    from napari_omniseg._widgets._sources import ArraySource
    from napari_omniseg.corrections import CorrectionSession, SlideInfo, export_corrections
    from napari_omniseg.corrections.finetune import FinetuneConfig, finetune
    from napari_omniseg.inference.engine import EngineConfig, Segmenter, segment_region
    from napari_omniseg.model import ModelRegistry, load_checkpoint
    from napari_omniseg.tissues import get_tissue
    from napari_omniseg.training.data import Sample
    from napari_omniseg.training.loop import evaluate_samples

    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    base = Path(sys.argv[1])
    splits = str(load_checkpoint(base).provenance.get("train_split", "")).split("+")
    if "val" in splits or "test" in splits:
        print(f"{base} was trained on {'+'.join(splits)}; this protocol corrects val and test images, "
              "which must be unseen: give a model trained on the train split only", file=sys.stderr)
        return 2
    reg = ModelRegistry()
    reg.set_active(base)
    seg = Segmenter(load_checkpoint(base), EngineConfig(core=256, margin=32, threads=1))
    out = Path(tempfile.mkdtemp(prefix="omniseg-gain-data-")) / "training"

    def correct(split: str, which: slice):
        img, gt, patches = build_renal_mosaic(split=split)
        src = ArraySource(img, 1.0, name=f"renal-demo-{split}")
        s = CorrectionSession.open(Path(tempfile.mkdtemp()) / "p.omniseg",
                                   SlideInfo(f"renal-demo-{split}", img.shape[:2], 1.0))
        for p in patches[which]:
            y, x, h, w = p["box"]
            res, _ = segment_region(seg, src, (x, y, w, h), p["tissues"])
            for tname in p["tissues"]:
                r, t = res[tname], get_tissue(tname)
                truth = (gt[y : y + h, x : x + w] == t.id + 1).astype(np.uint8)
                s.set_region(t, truth, r.origin, r.factor, r.mpp, (x, y, w, h), seg.ckpt.version, force=True)
                s.set_reviewed(t)
            s.commit(p["tissues"])
        return export_corrections(s, src, out, patch=128)

    t0 = time.perf_counter()
    e1 = correct("test", slice(0, None, 2))
    e2 = correct("val", slice(None))
    prep = time.perf_counter() - t0
    img, gt, patches = build_renal_mosaic(split="test")
    unseen = []
    for p in patches[1::2]:
        y, x, h, w = p["box"]
        for tname in p["tissues"]:
            t = get_tissue(tname)
            unseen.append(Sample(Path(p["file"]), Path(p["file"]), t, stain=p["stain"],
                                 image=np.ascontiguousarray(img[y : y + h, x : x + w]),
                                 mask=gt[y : y + h, x : x + w] == t.id + 1))
    _, b = evaluate_samples(load_checkpoint(base), unseen)
    report = {"machine": f"{os.cpu_count()} CPU cores, 1 torch thread", "model": base.name,
              "exported": {"test half": e1.per_tissue, "val": e2.per_tissue}, "prepare_seconds": round(prep, 1),
              "unseen": {"n": len(unseen), "before": b["mean_dice"],
                         "before_per_tissue": {k: v["dice"] for k, v in b["per_tissue"].items()}},
              "runs": []}
    print(f"exported {e1.n_patches + e2.n_patches} patches; unseen test patches: {len(unseen)}, "
          f"Dice before {b['mean_dice']:.3f}", flush=True)
    variants = [("widget default: 3 epochs, lr 1e-4, frozen encoder", {}),
                ("3 epochs, lr 5e-4", {"lr": 5e-4}),
                ("default + reference demo data (4 per tissue)", {"reference": str(Path(__file__).resolve().parents[3]
                                                                                  / "shared" / "data" / "renal-demo")}),
                ("10 epochs, lr 1e-4", {"epochs": 10})]
    for name, kw in variants:
        if "reference" in kw and not Path(kw["reference"]).exists():
            continue
        t = time.perf_counter()
        r = finetune(out, reg, None, FinetuneConfig(threads=1, **kw))
        secs = time.perf_counter() - t
        _, a = evaluate_samples(load_checkpoint(r.path), unseen)
        row = {"variant": name, "seconds": round(secs, 1), "n_train": r.n_train, "n_val": r.n_val,
               "n_reference": r.n_reference, "best_epoch": r.history.get("best_epoch"),
               "heldout_before": r.before_dice, "heldout_after": r.after_dice,
               "unseen_after": a["mean_dice"], "unseen_after_per_tissue": {k: v["dice"] for k, v in a["per_tissue"].items()}}
        report["runs"].append(row)
        print(f"{name:48s} {secs:6.1f} s  held-out {r.before_dice:.3f} -> {r.after_dice:.3f}  "
              f"unseen {b['mean_dice']:.3f} -> {a['mean_dice']:.3f}", flush=True)
    (Path(__file__).resolve().parent / "finetune_gain.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
