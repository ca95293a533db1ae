"""The ``omniseg`` command: the same core the napari widgets use.

Sub-commands register themselves in :data:`COMMANDS`; heavy imports (torch, dask)
happen inside each command so ``omniseg --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str):
    def deco(fn):
        COMMANDS[name] = (fn.add_arguments, fn)  # type: ignore[attr-defined]
        return fn

    return deco


def _args(add: Callable[[argparse.ArgumentParser], None]):
    def deco(fn):
        fn.add_arguments = add
        return fn

    return deco


class _Bar:
    """A tqdm progress bar on stderr, or nothing when stderr is not a terminal and quiet."""

    def __init__(self, total: int, desc: str, quiet: bool = False):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="step", disable=quiet, file=sys.stderr, dynamic_ncols=True)

    def update(self, n: int = 1, **post):
        if post:
            self.bar.set_postfix(**post, refresh=False)
        self.bar.update(n)

    def close(self):
        self.bar.close()


def _fmt(x, nd=3):
    try:
        import math

        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"
    except (TypeError, ValueError):
        return str(x)


# --------------------------------------------------------------------------- info
def _info_args(p):
    p.add_argument("--checkpoint", "-c", help="checkpoint (.safetensors); default: the active model")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--device", default="auto", help="the device to describe: auto (cuda > mps > cpu), cpu, cuda, mps")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=int, default=0, help="CPU threads a run would be given (0 = default)")


@command("info")
@_args(_info_args)
def cmd_info(a: argparse.Namespace) -> int:
    """Show the tissues, their magnifications and the model's size and provenance."""
    from .model import count_parameters, load_checkpoint, resolve_checkpoint

    from .inference.engine import pick_device
    from .inference.precision import describe

    path = resolve_checkpoint(a.checkpoint)
    ck = load_checkpoint(path)
    try:
        runtime = describe(pick_device(a.device), a.precision, a.threads)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    info = {
        "checkpoint": str(path),
        "version": ck.version,
        "architecture": ck.model.cfg.name,
        "n_parameters": count_parameters(ck.model),
        "tissues": [
            {"id": t.id, "name": t.name, "short": t.short, "magnification": t.magnification, "mpp": t.mpp, "color": t.color}
            for t in ck.tissues
        ],
        "metrics": ck.metrics,
        "provenance": ck.provenance,
        "runtime": runtime,
    }
    if a.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"checkpoint   {info['checkpoint']}")
    print(f"version      {info['version']}")
    print(f"parameters   {info['n_parameters']:,}")
    rt = f"{runtime['device']}, {runtime['precision']}"
    if "threads" in runtime:
        rt += (f", {runtime['threads']} threads of {runtime['cpu_cores']} cores, AMX/AVX-512 bf16 "
               f"{'present' if runtime['cpu_fast_bf16'] else 'absent'}")
    print(f"runs on      {rt}")
    print("tissues:")
    for t in info["tissues"]:
        print(f"  {t['id']}  {t['name']:<24} {t['magnification']:>3}x  {t['mpp']:.2f} um/px  {t['color']}")
    if ck.metrics.get("val_mean_dice") is not None:
        print(f"validation mean Dice {ck.metrics['val_mean_dice']:.3f}")
    return 0


# --------------------------------------------------------------------------- train
def _train_args(p):
    p.add_argument("--data", "-d", required=True, help="dataset: folder (Omni-Seg layout, data_list.csv or manifest.csv) or CSV")
    p.add_argument("--split-file", help="CSV with image_path and split columns (default: splits.csv beside the data)")
    p.add_argument("--train-split", default="train", help="split(s) to train on, e.g. train or train+val (default train)")
    p.add_argument("--val-split", default="val", help="split used to pick the best epoch; 'none' to keep the last (default val)")
    p.add_argument("--test-split", default="test", help="split evaluated at the end; 'none' to skip (default test)")
    p.add_argument("--out", "-o", required=True, help="new checkpoint path (.safetensors); never overwritten")
    p.add_argument("--init", help="fine-tune from this checkpoint instead of a fresh model")
    p.add_argument("--freeze-encoder", action="store_true", help="train only decoder, controller and heads")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--crop", type=int, default=256, help="random training crop side (multiple of 16)")
    p.add_argument("--val-every", type=int, default=1, help="validate every N epochs (default 1)")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw", help="sgd = the paper's Nesterov SGD, momentum 0.99")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-3 for both optimizers)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--mild-augment", action="store_true",
                   help="the reference's mild colour augmentation instead of the stain-robust default")
    p.add_argument("--extra", action="append", default=[], metavar="DATA",
                   help="another dataset whose every row is added to training, e.g. third-party annotations in a "
                        "manifest with their own um/px (resampled to each tissue's magnification); repeatable")
    p.add_argument("--no-relations", action="store_true",
                   help="supervise only the labelled tissue (no anatomy-derived labels for the others)")
    p.add_argument("--negatives", type=int, default=0, metavar="K",
                   help="K extra batches per head and epoch of patches labelled for a tissue the head excludes, "
                        "resampled to its magnification (e.g. arteries shown to the glomerulus head); default 0")
    p.add_argument("--zoom", type=float, default=0.0, metavar="P",
                   help="with probability P, zoom each training image by 0.45-1.3 (log-uniform), so structures are also "
                        "seen smaller or larger than at their magnification (e.g. mouse glomeruli); default 0")
    p.add_argument("--lab-transfer", type=float, default=0.0, metavar="P",
                   help="colour transfer: with probability P a patch's tissue colours are moved (CIELAB) to "
                        "colours drawn from the spread of the training images' own, so one slide's or lab's "
                        "colours do not become the model's notion of a tissue (default 0: off)")
    p.add_argument("--defocus", type=float, default=0.0, metavar="P",
                   help="with probability P, make each training image less sharp (blur sigma 0.5-2 px, or shrink 1.5-3x "
                        "and enlarge back), so softer scans from another scanner or focus are still read; default 0")
    p.add_argument("--statistics", choices=("tile", "tissue"),
                   help="where the network's normalisation statistics and pooled vector come from: every pixel "
                        "of a crop ('tile') or only its tissue ('tissue': glass around a fragment or at a "
                        "biopsy's edge does not change what the network sees; the engine then uses the model "
                        "so too); default: as the --init model was trained, 'tile' for a new model")
    p.add_argument("--state-dir", help="folder for a resumable training state (rerun the same command to resume)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = default)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--fp16", action="store_true", help="store the weights as float16 (half the size)")
    p.add_argument("--history", help="write the per-epoch history as JSON here")
    p.add_argument("--json", action="store_true", help="print the final evaluation as JSON")
    p.add_argument("--quiet", "-q", action="store_true")


@command("train")
@_args(_train_args)
def cmd_train(a: argparse.Namespace) -> int:
    """Train Omni-Seg from partially labelled patches (one tissue labelled per image)."""
    import torch

    from .model import load_checkpoint
    from .training.data import load_arrays, load_dataset, select
    from .training.augment import AugmentConfig, strong_augment
    from .training.loop import TrainConfig, TrainingCancelled, evaluate_samples, steps_per_epoch, train
    from .training.metrics import format_table

    if not 0.0 <= a.zoom <= 1.0:
        print(f"error: --zoom is a probability (0-1), got {a.zoom}", file=sys.stderr)
        return 2
    if not 0.0 <= a.lab_transfer <= 1.0:
        print(f"error: --lab-transfer is a probability (0-1), got {a.lab_transfer}", file=sys.stderr)
        return 2
    if not 0.0 <= a.defocus <= 1.0:
        print(f"error: --defocus is a probability (0-1), got {a.defocus}", file=sys.stderr)
        return 2
    if a.negatives < 0:
        print(f"error: --negatives is a number of batches (0 or more), got {a.negatives}", file=sys.stderr)
        return 2
    samples = load_dataset(a.data, a.split_file)
    tr = load_arrays(select(samples, a.train_split))
    for extra in a.extra:
        tr += load_arrays(load_dataset(extra))
    va = [] if a.val_split == "none" else load_arrays(select(samples, a.val_split))
    te = [] if a.test_split == "none" else load_arrays(select(samples, a.test_split))
    if not tr:
        print(f"error: no samples in split {a.train_split!r} of {a.data}", file=sys.stderr)
        return 2
    cfg = TrainConfig(
        epochs=a.epochs, batch_size=a.batch_size, crop=a.crop, optimizer=a.optimizer, seed=a.seed,
        freeze_encoder=a.freeze_encoder, augment=not a.no_augment, threads=a.threads, device=a.device,
        val_every=a.val_every, relations=not a.no_relations, cross_scale_negatives=a.negatives,
        aug=AugmentConfig() if a.mild_augment else strong_augment(),
        tissue_statistics=None if a.statistics is None else a.statistics == "tissue",
    )
    if a.lr is not None:
        cfg.lr = a.lr
    cfg.aug.p_zoom = a.zoom
    cfg.aug.p_defocus = a.defocus
    cfg.aug.p_lab_transfer = a.lab_transfer
    init = load_checkpoint(a.init) if a.init else None
    n_steps = steps_per_epoch(tr, cfg) * a.epochs
    bar = _Bar(n_steps, "train", a.quiet)
    last = {}

    def prog(ev):
        if ev["phase"] == "train":
            bar.update(1, epoch=f"{ev['epoch']}/{ev['epochs']}", loss=f"{ev['loss']:.3f}", **last)
        elif ev["phase"] == "epoch" and "val_mean_dice" in ev:
            last["val_dice"] = f"{ev['val_mean_dice']:.3f}"

    print(f"training on {len(tr)} patches ({a.train_split}), selecting on {len(va)} ({a.val_split}), "
          f"{a.epochs} epochs, crop {a.crop}", file=sys.stderr)
    try:
        ck, hist = train(tr, va, a.out, cfg, init=init, on_progress=prog, state_dir=a.state_dir,
                         provenance={"data": str(a.data), "train_split": a.train_split, "val_split": a.val_split,
                                     "command": " ".join(sys.argv)},
                         save_dtype=torch.float16 if a.fp16 else torch.float32)
    except TrainingCancelled as e:
        bar.close()
        print(f"cancelled: {e}", file=sys.stderr)
        return 130
    bar.close()
    if a.history:
        Path(a.history).write_text(json.dumps(hist, indent=2))
    print(f"wrote {a.out} (best epoch {hist['best_epoch']}, {hist['wall_time_s']:.0f} s)", file=sys.stderr)
    if te:
        rows, summ = evaluate_samples(ck, te, device=a.device)
        if a.json:
            print(json.dumps({"checkpoint": str(a.out), "split": a.test_split, **summ}, indent=2))
        else:
            print(f"\n{a.test_split} split ({len(te)} patches):")
            print(format_table(summ, [t.name for t in ck.tissues]))
    return 0


def _counts(samples):
    c: dict = {}
    for s in samples:
        c[s.tissue.id] = c.get(s.tissue.id, 0) + 1
    return c


# --------------------------------------------------------------------------- evaluate
def _eval_args(p):
    p.add_argument("--checkpoint", "-c", help="checkpoint (.safetensors); default: the active model")
    p.add_argument("--data", "-d", required=True, help="dataset folder or CSV (as for train)")
    p.add_argument("--split-file")
    p.add_argument("--split", default="test", help="split(s) to evaluate, e.g. test or val+test; 'all' for every sample")
    p.add_argument("--device", default="auto")
    p.add_argument("--per-stain", action="store_true", help="also print the table per stain")
    p.add_argument("--json", action="store_true", help="print JSON: per_tissue {dice, hd_um, hd95_um, msd_um, n}, mean_dice ...")


@command("evaluate")
@_args(_eval_args)
def cmd_evaluate(a: argparse.Namespace) -> int:
    """Score a checkpoint: foreground Dice, Hausdorff (max, 95th pct) and mean surface distance in microns."""
    from .model import load_checkpoint, resolve_checkpoint
    from .training.data import load_arrays, load_dataset, select
    from .training.loop import evaluate_samples
    from .training.metrics import format_table

    path = resolve_checkpoint(a.checkpoint)
    ck = load_checkpoint(path)
    samples = load_dataset(a.data, a.split_file)
    sel = load_arrays(select(samples, None if a.split == "all" else a.split))
    if not sel:
        print(f"error: no samples in split {a.split!r}", file=sys.stderr)
        return 2
    rows, summ = evaluate_samples(ck, sel, device=a.device)
    if a.json:
        print(json.dumps({"checkpoint": str(path), "version": ck.version, "split": a.split, "n": len(sel), **summ}, indent=2))
        return 0
    print(f"{path.name}  split={a.split}  n={len(sel)}")
    print(format_table(summ, [t.name for t in ck.tissues]))
    if a.per_stain:
        for tissue, by_stain in summ["per_tissue_stain"].items():
            for stain, v in by_stain.items():
                print(f"  {tissue:<24} {stain:<4} n={v['n']:<3} dice={_fmt(v['dice'])} hd95={_fmt(v['hd95_um'], 1)} um")
    return 0


# --------------------------------------------------------------------------- calibrate
def _cal_args(p):
    p.add_argument("--checkpoint", "-c", help="checkpoint to calibrate; default: the active model")
    p.add_argument("--data", "-d", required=True, action="append",
                   help="labelled patches (dataset folder or CSV, as for train); repeat to pool several")
    p.add_argument("--split-file")
    p.add_argument("--split", default="train+val", help="split(s) of the first --data to use ('all' for every sample); "
                   "never the split you report scores on")
    p.add_argument("--count-negatives", action="store_true",
                   help="each cut also pays for the share of other tissues' labelled structures it marks (those the "
                        "registry says exclude the tissue, resampled to its magnification): Dice minus that share")
    p.add_argument("--min-samples", type=int, default=4,
                   help="tissues with fewer patches showing them keep their threshold (patches annotated empty do not vote)")
    p.add_argument("--hold-out-every", type=int, default=0, metavar="N",
                   help="leave out every N-th patch (by file name) of each further --data, as train_demo.py's option")
    p.add_argument("--out", "-o", required=True, help="new checkpoint (.safetensors): same weights, calibrated thresholds")
    p.add_argument("--device", default="auto")


@command("calibrate")
@_args(_cal_args)
def cmd_calibrate(a: argparse.Namespace) -> int:
    """Choose each tissue's decision threshold on labelled patches and write a new checkpoint with them."""
    import torch

    from .model import load_checkpoint, resolve_checkpoint, save_checkpoint
    from .training.calibrate import calibrate_thresholds
    from .training.data import load_arrays, load_dataset, select

    path = resolve_checkpoint(a.checkpoint)
    ck = load_checkpoint(path)
    sel = []
    for k, d in enumerate(a.data):
        samples = load_dataset(d, a.split_file if k == 0 else None)
        if k > 0 and a.hold_out_every:
            samples = [s for i, s in enumerate(sorted(samples, key=lambda s: str(s.image_path)))
                       if i % a.hold_out_every != a.hold_out_every - 1]
        sel += load_arrays(select(samples, None if (a.split == "all" or k > 0) else a.split))
    if not sel:
        print(f"error: no samples in split {a.split!r}", file=sys.stderr)
        return 2
    th, table = calibrate_thresholds(ck, sel, min_samples=a.min_samples, device=a.device, negatives=a.count_negatives)
    prov = dict(ck.provenance, calibrated_from=ck.version, calibration={
        "data": [str(d) for d in a.data], "split": a.split, "n": len(sel), "command": " ".join(sys.argv),
        "count_negatives": bool(a.count_negatives),
        ("dice_minus_marked_by_threshold" if a.count_negatives else "dice_by_threshold"):
            {t: {str(k): round(v, 4) for k, v in row.items()} for t, row in table.items()}})
    dtype = torch.float16 if str(read_dtype(path)) == "float16" else torch.float32
    save_checkpoint(ck.model, a.out, ck.tissues, normalization=ck.normalization, provenance=prov,
                    metrics=ck.metrics, dtype=dtype, thresholds=th)
    print(f"{path.name}: {len(sel)} patches")
    what = "Dice - marked share" if a.count_negatives else "Dice"
    for t in ck.tissues:
        row = table.get(t.name)
        old = ck.threshold(t.name)
        if row is None:
            print(f"  {t.name:<24} no patches: threshold {old:.2f} kept")
            continue
        new = th.get(t.name, old)
        print(f"  {t.name:<24} threshold {old:.2f} -> {new:.2f}   {what} {row.get(old, float('nan')):.3f} -> {row[new]:.3f}"
              if old in row else f"  {t.name:<24} threshold {old:.2f} -> {new:.2f}   {what} {row[new]:.3f}")
    print(f"wrote {a.out}")
    return 0


def read_dtype(path) -> str:
    from .model.checkpoint import read_sidecar

    return read_sidecar(path).get("dtype", "float32")


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    _load_plugins()
    p = argparse.ArgumentParser(
        prog="omniseg",
        description="Omni-Seg multi-tissue kidney segmentation: one dynamic network for six tissue types.",
    )
    from . import __version__

    p.add_argument("--version", action="version", version=f"napari-omniseg {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (add, fn) in COMMANDS.items():
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        sp = sub.add_parser(name, help=doc, description=(fn.__doc__ or "").strip())
        add(sp)
        sp.set_defaults(_fn=fn)
    return p


def _load_plugins() -> None:
    """Import modules that register more sub-commands (segment, export, demo...)."""
    import importlib

    for mod in ("napari_omniseg.inference.cli", "napari_omniseg.demo"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if not getattr(a, "_fn", None):
        p.print_help()
        return 0
    from .corrections.session import SessionError
    from .labels.store import StoreError
    from .model.checkpoint import CheckpointError
    from .slides.base import SlideError
    from .tissues import UnknownTissueError
    from .training.data import DataError

    try:
        return int(a._fn(a) or 0)
    except (CheckpointError, DataError, SlideError, StoreError, SessionError, UnknownTissueError, FileExistsError,
            FileNotFoundError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # read-only or full disk, permissions, a file vanishing mid-run
        what = e.strerror or str(e) or type(e).__name__
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{what}", file=sys.stderr)
        return 2
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:  # malformed files past the checks
        if os.environ.get("OMNISEG_DEBUG"):
            raise
        print(f"error: {type(e).__name__}: {_one_line(e)} (set OMNISEG_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


if __name__ == "__main__":  # run through the package module so sub-commands register in one place
    from napari_omniseg.cli import main as _main

    sys.exit(_main())
