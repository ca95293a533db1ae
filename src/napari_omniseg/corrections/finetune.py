"""One-click fine-tuning on exported corrections (Qt-free).

:func:`finetune` loads the exported patches (``manifest.csv``), optionally mixes in
the training split of a reference dataset (the renal demo data), measures the
starting checkpoint on the held-out exported patches, trains a copy of it and
writes the result as a NEW checkpoint in the model registry
(:meth:`ModelRegistry.new_version_path`), then measures it on the same patches.

It never changes which checkpoint is active: the caller decides, after seeing the
before/after Dice, whether to :func:`activate` the new version or keep the old one,
and :func:`rollback` undoes an activation.  A cancelled or failed run raises
(:class:`TrainingCancelled` / :class:`TrainingError` from the training loop) and
writes no checkpoint, so the registry is exactly as before.

CPU defaults: the encoder is frozen (only the decoder and the dynamic heads learn),
3 epochs of 128 px crops, AdamW at 1e-4; see docs/user-guide.md for the measured
cost and gain.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ProgressFn = Callable[[dict], None]
StopFn = Callable[[], bool]


@dataclass
class FinetuneConfig:
    epochs: int = 3
    crop: int = 128
    batch_size: int = 4
    lr: float = 1e-4  #: measured: 5e-4 learns the corrected slide a little faster but forgets more elsewhere
    freeze_encoder: bool = True
    seed: int = 0
    device: str = "cpu"
    threads: int = 0
    #: also train on the training split of this reference dataset (None = corrections only)
    reference: "str | Path | None" = None
    #: at most this many reference samples per tissue (keeps a CPU fine-tune short)
    reference_per_tissue: int = 4
    augment: bool = True


@dataclass
class FinetuneResult:
    path: Path
    version: str
    parent: str
    before: dict | None  #: summary of evaluate_samples on the held-out patches before training
    after: dict | None
    history: dict
    n_train: int
    n_val: int
    n_reference: int
    seconds: float
    per_tissue: dict = field(default_factory=dict)  #: tissue -> {"before": dice, "after": dice}

    @property
    def before_dice(self) -> float | None:
        return None if self.before is None else self.before.get("mean_dice")

    @property
    def after_dice(self) -> float | None:
        return None if self.after is None else self.after.get("mean_dice")


class FinetuneError(RuntimeError):
    pass


def _reference_samples(ref, per_tissue: int, seed: int):
    import numpy as np

    from ..training.data import load_dataset, select

    samples = select(load_dataset(ref), "train")
    rng = np.random.default_rng(seed)
    out = []
    by: dict[str, list] = {}
    for s in samples:
        by.setdefault(s.tissue.name, []).append(s)
    for name in sorted(by):
        group = by[name]
        idx = rng.permutation(len(group))[:per_tissue]
        out += [group[i] for i in sorted(idx)]
    return out


def finetune(
    dataset: "str | Path",
    registry=None,
    init: "str | Path | None" = None,
    cfg: FinetuneConfig | None = None,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> FinetuneResult:
    """Fine-tune ``init`` (default: the registry's active checkpoint) on ``dataset``.

    ``dataset`` is an export folder (or its ``manifest.csv``).  Rows with
    ``split = val`` are held out for the before/after comparison and model selection;
    the rest train.  Returns a :class:`FinetuneResult`; the new checkpoint is NOT made
    active.
    """
    from ..model.checkpoint import load_checkpoint
    from ..model.registry import ModelRegistry, resolve_checkpoint
    from ..training.data import DataError, load_arrays, load_dataset
    from ..training.loop import TrainConfig, evaluate_samples, train

    cfg = cfg or FinetuneConfig()
    registry = registry or ModelRegistry()
    t0 = time.perf_counter()
    if cfg.threads:  # in this thread: a worker thread does not inherit the caller's setting
        import torch

        torch.set_num_threads(cfg.threads)

    def progress(ev: dict) -> None:
        if on_progress is not None:
            on_progress(ev)

    def stop() -> bool:
        return bool(should_stop and should_stop())

    dataset = Path(dataset)
    if not dataset.exists() or (dataset.is_dir() and not (dataset / "manifest.csv").exists()):
        raise FinetuneError(f"{dataset}: no manifest.csv; export reviewed corrections first")
    try:
        samples = load_arrays(load_dataset(dataset))
    except DataError as e:
        raise FinetuneError(f"cannot load the exported corrections: {e}") from None
    val = [s for s in samples if s.split == "val"]
    trn = [s for s in samples if s.split != "val"]
    if not trn:
        raise FinetuneError(f"{dataset}: no training patches (all {len(samples)} are held out); export more corrections")
    ref = []
    if cfg.reference:
        try:
            ref = load_arrays(_reference_samples(cfg.reference, cfg.reference_per_tissue, cfg.seed))
        except (DataError, OSError) as e:
            raise FinetuneError(f"cannot load the reference data {cfg.reference}: {e}") from None

    init_path = resolve_checkpoint(init, registry)
    progress({"phase": "load", "message": f"loading {Path(init_path).name}"})
    before = None
    per_tissue: dict = {}
    if val:
        progress({"phase": "evaluate", "which": "before", "n": len(val)})
        base = load_checkpoint(init_path, device=cfg.device if cfg.device != "auto" else "cpu")
        _, before = evaluate_samples(base, val, device=cfg.device)
        for tname, v in before.get("per_tissue", {}).items():
            per_tissue.setdefault(tname, {})["before"] = v.get("dice")
        del base
    if stop():
        from ..training.loop import TrainingCancelled

        raise TrainingCancelled("cancelled before training; no checkpoint written")
    init_ckpt = load_checkpoint(init_path)  # a private copy: training changes it in place
    parent = init_ckpt.version
    out = registry.new_version_path("finetuned")
    tc = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, optimizer="adamw", lr=cfg.lr, crop=cfg.crop,
                     seed=cfg.seed, freeze_encoder=cfg.freeze_encoder, augment=cfg.augment, device=cfg.device,
                     threads=cfg.threads)
    prov = {"command": "napari-omniseg fine-tune", "dataset": str(dataset), "reference": str(cfg.reference or ""),
            "n_reference": len(ref), "origin": "corrections"}
    ckpt, history = train(trn + ref, val, out, tc, init=init_ckpt, tissues=init_ckpt.tissues, on_progress=progress,
                          should_stop=should_stop, provenance=prov)
    after = None
    if val:
        progress({"phase": "evaluate", "which": "after", "n": len(val)})
        _, after = evaluate_samples(ckpt, val, device=cfg.device)
        for tname, v in after.get("per_tissue", {}).items():
            per_tissue.setdefault(tname, {})["after"] = v.get("dice")
    return FinetuneResult(
        path=Path(out),
        version=ckpt.version,
        parent=parent,
        before=before,
        after=after,
        history=history,
        n_train=len(trn),
        n_val=len(val),
        n_reference=len(ref),
        seconds=time.perf_counter() - t0,
        per_tissue=per_tissue,
    )


def activate(registry, path: "str | Path") -> "Path | None":
    """Make ``path`` active; returns the previously active checkpoint (for :func:`rollback`)."""
    prev = registry.active()
    registry.set_active(path)
    return prev


def rollback(registry, previous: "str | Path | None") -> None:
    """Make ``previous`` active again (``None`` or the shipped model: fall back to it)."""
    from ..model.registry import shipped_checkpoint

    ship = shipped_checkpoint()
    if previous is None or (ship is not None and Path(previous).resolve() == ship.resolve()):
        registry.reset_active()
    else:
        registry.set_active(previous)
