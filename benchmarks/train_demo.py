"""Train Omni-Seg on the renal demo train split, select on val, report the test split.

Prints the per-tissue test table (foreground Dice, HD, HD95, MSD in microns), the
wall time and the machine, and writes them as markdown (``--report``) and JSON.

    python benchmarks/train_demo.py --data ../shared/data/renal-demo --epochs 200 \
        --out runs/demo.safetensors --report docs/training-results.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from napari_omniseg.training.augment import AugmentConfig, strong_augment
from napari_omniseg.training.data import load_arrays, load_dataset, select
from napari_omniseg.training.loop import TrainConfig, evaluate_samples, train
from napari_omniseg.training.metrics import format_table


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA), torch {torch.__version__}"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores, torch {torch.__version__}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/renal-demo"))
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="val")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--val-every", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--optimizer", default="adamw")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--extra", action="append", default=[],
                   help="another dataset (manifest/CSV/folder) whose samples are all added to training; repeatable")
    p.add_argument("--external", action="append", default=[],
                   help="a dataset to score after training (never trained on here unless also --extra); repeatable")
    p.add_argument("--hold-out-every", type=int, default=0, metavar="N",
                   help="hold every N-th sample of each --extra set (sorted by image path) out of training and "
                        "score it as an external set: an unseen-tile estimate for data added to training")
    p.add_argument("--init", help="warm start: fine-tune this checkpoint instead of a new model "
                                  "('shipped' = the model in the package)")
    p.add_argument("--reference-recipe", action="store_true",
                   help="the earlier recipe: only the labelled tissue, per-image Dice+BCE, uniform crops, one pass per epoch, "
                        "reference controller init")
    p.add_argument("--no-relations", action="store_true", help="lever off: only the labelled tissue is supervised")
    p.add_argument("--no-object-crop", action="store_true", help="lever off: uniform random crops")
    p.add_argument("--no-balance", action="store_true", help="lever off: one pass over every sample per epoch")
    p.add_argument("--balance", action="store_true",
                   help="lever on with --reference-recipe: tissue-balanced steps (every tissue the same number of batches)")
    p.add_argument("--strong-color", action="store_true",
                   help="lever on with --reference-recipe: the stain-robust colour augmentation")
    p.add_argument("--zoom", type=float, default=0.0, metavar="P",
                   help="lever on: isotropic zoom 0.45-1.3 (log-uniform) with probability P, so small (e.g. mouse) "
                        "and large structures are seen at one magnification")
    p.add_argument("--defocus", type=float, default=0.0, metavar="P",
                   help="lever on: with probability P a loss of sharpness (blur sigma 0.5-2 px, or shrink 1.5-3x "
                        "and enlarge back), so a softer scan does not hide what the heads look for")
    p.add_argument("--lab-transfer", type=float, default=0.0, metavar="P",
                   help="lever on: with probability P the patch's tissue colours moved (Reinhard, CIELAB) to "
                        "colour statistics drawn from the spread of the training images' own")
    p.add_argument("--mosaic", type=float, default=0.0, metavar="P",
                   help="probability that a batch is of 2 x 2 mosaics of same-magnification training images "
                        "(twice the crop's side: the context of a whole-slide tile)")
    p.add_argument("--glass-edge", type=float, default=0.0, metavar="P",
                   help="lever on: with probability P a crop keeps only part of its tissue, 20-75 %% glass "
                        "(background for every head)")
    p.add_argument("--mosaic-glass", type=float, default=0.0, metavar="Q",
                   help="in a mosaic, probability that another quarter is glass (background for every head)")
    p.add_argument("--statistics", choices=("tile", "tissue"),
                   help="normalisation statistics and pooled vector over every pixel of a crop ('tile') or its "
                        "tissue only ('tissue', as the engine then takes them); default: as the --init model was "
                        "trained, 'tile' for a new model")
    p.add_argument("--negatives", type=int, default=0, metavar="K",
                   help="lever on: K extra batches per head and epoch of patches labelled for a tissue the head "
                        "excludes, resampled to its magnification (training/negatives.py)")
    p.add_argument("--uniform-init", action="store_true", help="lever off: reference controller init and raw pooled vector")
    p.add_argument("--mild-color", action="store_true", help="lever off: the reference's mild colour augmentation")
    p.add_argument("--stains", help="train only on these stains (comma-separated), e.g. for leave-one-stain-out")
    p.add_argument("--test-stains", help="score the test split only on these stains")
    p.add_argument("--out", required=True, help="checkpoint to write (.safetensors)")
    p.add_argument("--fp16", action="store_true")
    p.add_argument("--state-dir", help="resumable state folder")
    p.add_argument("--report", help="write a markdown report here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    samples = load_dataset(a.data)

    def stains(group, spec):
        if not spec:
            return group
        keep = {x.strip() for x in spec.split(",")}
        return [s for s in group if s.stain in keep]

    tr = load_arrays(stains(select(samples, a.train_split), a.stains))
    n_demo_train = len(tr)
    held_out = []
    for extra in a.extra:
        ex = sorted(load_dataset(extra), key=lambda s: str(s.image_path))
        if a.hold_out_every:
            held_out += [s for i, s in enumerate(ex) if i % a.hold_out_every == a.hold_out_every - 1]
            ex = [s for i, s in enumerate(ex) if i % a.hold_out_every != a.hold_out_every - 1]
        tr += load_arrays(ex)
    va = load_arrays(stains(select(samples, a.val_split), a.stains)) if a.val_split != "none" else []
    te = load_arrays(stains(select(samples, "test"), a.test_stains))
    ref = a.reference_recipe
    aug = AugmentConfig() if ((ref and not a.strong_color) or a.mild_color) else strong_augment()
    aug.p_zoom = a.zoom
    aug.p_defocus = a.defocus
    aug.p_lab_transfer = a.lab_transfer
    cfg = TrainConfig(epochs=a.epochs, crop=a.crop, batch_size=a.batch_size, optimizer=a.optimizer, lr=a.lr,
                      seed=a.seed, device=a.device, threads=a.threads, val_every=a.val_every, aug=aug,
                      relations=not (ref or a.no_relations), object_crop=0.0 if (ref or a.no_object_crop) else 0.7,
                      balanced=a.balance or not (ref or a.no_balance),
                      controller_lr_mult=1.0 if (ref or a.uniform_init) else 0.1,
                      cross_scale_negatives=a.negatives, mosaic=a.mosaic, mosaic_glass=a.mosaic_glass, glass_edge=a.glass_edge,
                      tissue_statistics=None if a.statistics is None else a.statistics == "tissue")
    init = None
    if a.init:
        from napari_omniseg.model.checkpoint import load_checkpoint
        from napari_omniseg.model.registry import shipped_checkpoint

        init = load_checkpoint(shipped_checkpoint() if a.init == "shipped" else a.init)
    elif ref or a.uniform_init:
        from napari_omniseg.model.checkpoint import new_checkpoint
        from napari_omniseg.model.network import NetConfig
        from napari_omniseg.tissues import TISSUES

        nc = NetConfig(n_tissues=len(TISSUES), tissue_scales=tuple(t.scale_id for t in TISSUES),
                       pool_norm="none", controller_init="uniform")
        init = new_checkpoint(TISSUES, cfg=nc, seed=a.seed)

    def prog(ev):
        if ev["phase"] == "epoch":
            v = ev.get("val_mean_dice")
            print(f"epoch {ev['epoch']:3d}/{ev['epochs']}  loss {ev['loss']:.4f}  "
                  f"val mean Dice {'-' if v is None else f'{v:.3f}'}  best epoch {ev['best_epoch']}  {ev['time_s']:.0f} s",
                  flush=True)

    t0 = time.perf_counter()
    ck, hist = train(tr, va, a.out, cfg, init=init, on_progress=prog, state_dir=a.state_dir,
                     provenance={"data": "renal-demo", "train_split": a.train_split, "val_split": a.val_split,
                                 "extra_data": [Path(e).parent.name if Path(e).is_file() else Path(e).name for e in a.extra],
                                 "n_extra": len(tr) - n_demo_train, "stains": a.stains or "all",
                                 "init": a.init or "new",
                                 "command": " ".join(["python", "benchmarks/train_demo.py", *(argv or sys.argv[1:])])},
                     save_dtype=torch.float16 if a.fp16 else torch.float32)
    train_s = time.perf_counter() - t0
    rows, summ = evaluate_samples(ck, te, device=a.device)
    table = format_table(summ, [t.name for t in ck.tissues])
    head = (f"train split {a.train_split} ({len(tr)} patches), selection on {a.val_split} ({len(va)}), "
            f"test ({len(te)} patches); {a.epochs} epochs, crop {a.crop}, batch {a.batch_size}, {a.optimizer} lr {a.lr}, "
            f"seed {a.seed}; best epoch {hist['best_epoch']}; training wall time {train_s / 60:.1f} min on {machine()}")
    print(head)
    print(table)
    external = {}
    ext_sets = [(e, load_arrays(load_dataset(e))) for e in a.external]
    if held_out:
        ext_sets.append((f"held-out 1 in {a.hold_out_every} of --extra", load_arrays(held_out)))
    for ext, ex in ext_sets:
        erows, esumm = evaluate_samples(ck, ex, device=a.device)
        external[ext] = {"summary": esumm, "rows": erows}
        print(f"external {ext} ({len(ex)} images):")
        print(format_table(esumm, sorted({s.tissue.name for s in ex})))
    Path(a.out).with_suffix(".eval.json").write_text(json.dumps({"summary": summ, "rows": rows, "history": hist,
                                                                 "header": head, "external": external,
                                                                 "trained_tissues": sorted({s.tissue.name for s in tr})}, indent=2, default=str))
    if a.report:
        Path(a.report).parent.mkdir(parents=True, exist_ok=True)
        Path(a.report).write_text(f"{head}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
