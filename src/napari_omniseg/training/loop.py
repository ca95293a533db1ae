"""Training from partial labels, validation and evaluation.

Batches are tissue-homogeneous: each epoch every tissue's samples are shuffled into
batches of ``batch_size`` (the last one may be smaller; GroupNorm does not care),
and the batches of all tissues are interleaved at random.  Only the labelled
tissue's output is supervised.

Safety: ``should_stop`` is checked before every step; a cancelled or failed run
never writes the output checkpoint (and checkpoints are never overwritten).  A step
whose loss or gradients are not finite is skipped and counted; more than
``max_nonfinite`` such steps abort the run.  The best model by mean validation Dice
(mean over tissues of the per-tissue mean) is kept, or the last epoch when there is
no validation data; a model with non-finite weights
is never saved.  With ``state_dir`` the run writes a resumable state after every
epoch; randomness is derived from (seed, epoch), so a resumed run continues exactly
as the uninterrupted one would.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..model.checkpoint import Checkpoint, all_finite, atomic_write_bytes, new_checkpoint, save_checkpoint
from ..model.network import foreground
from ..tissues import TISSUES, Tissue, exclusive, with_registry_relations
from .augment import AugmentConfig, augment, lab_statistics, object_crop, random_crop
from .data import Sample, load_arrays
from .losses import dice_bce_loss, partial_label_loss, ring_weight
from .negatives import MAX_FACTOR, MIN_FACTOR, cross_scale_negatives, negative_batches
from .negatives import summary as negatives_summary
from .relations import build_targets
from .metrics import segmentation_scores, summarize
from ..inference.precision import cpu_has_fast_bf16  # noqa: F401 - also re-exported here

ProgressFn = Callable[[dict], None]
StopFn = Callable[[], bool]


class TrainingCancelled(RuntimeError):
    pass


class TrainingError(RuntimeError):
    pass


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 4
    optimizer: str = "adamw"  # "sgd" (Nesterov, momentum 0.99, as the paper) or "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    warmup_epochs: int = 0
    crop: int = 256
    seed: int = 1234
    freeze_encoder: bool = False
    augment: bool = True
    max_nonfinite: int = 5
    val_every: int = 1
    threads: int = 0  # 0 = torch default
    device: str = "cpu"
    aug: AugmentConfig = field(default_factory=AugmentConfig)
    #: anatomy-aware partial labels (training/relations.py): each image supervises every
    #: tissue of its magnification that the registry's relations inform, and crops with
    #: identical pixels merge their labels; the loss is :func:`.losses.partial_label_loss`.
    #: False: only the labelled tissue, with :func:`.losses.dice_bce_loss` (the reference)
    relations: bool = True
    #: weight of the derived (not directly labelled) tissues' terms in the loss
    derived_weight: float = 0.5
    #: probability that a training crop is placed over the labelled object
    object_crop: float = 0.7
    #: every tissue gets the same number of batches per epoch (small pools are cycled),
    #: instead of one pass over every sample
    balanced: bool = True
    #: learning-rate multipliers of the controller's parts (parameter groups): the
    #: per-(tissue, scale) heads and the image-dependent matrix; the backbone has 1
    head_lr_mult: float = 1.0
    controller_lr_mult: float = 0.1
    #: bf16 autocast where it is fast: CUDA with bf16, or a CPU with AVX-512 bf16 / AMX
    #: (checked at run time); fp32 everywhere else
    amp: bool = True
    #: negatives across magnifications (training/negatives.py): this many extra batches
    #: per head and epoch of patches labelled for a tissue the head excludes, resampled
    #: to the head's magnification (their structure is background); 0 = off
    cross_scale_negatives: int = 0
    #: weight of those batches' loss
    negative_weight: float = 1.0
    #: after training, choose each tissue's decision threshold on the training and
    #: validation patches (training/calibrate.py); False keeps the parent's (or 0.5)
    calibrate: bool = True
    #: probability that a batch is made of 2 x 2 mosaics (twice the crop's side): each
    #: sample's crop in a random quadrant, the other three filled with crops of other
    #: training images of its magnification (of its stain where there are any), their own
    #: labels kept and unknown where they have none. The engine segments a slide in
    #: tiles larger than a training patch, and the network's GroupNorm statistics and
    #: pooled vector are taken over the whole tile; this shows it that context. 0 = off
    mosaic: float = 0.0
    #: in a mosaic, the probability that a quarter other than the batch's own is glass
    #: (a near-white, slightly noisy field, background for every tissue), as the tiles at
    #: a biopsy's edge are: ``benchmarks/glass_context.py``
    mosaic_glass: float = 0.0
    #: probability that a training crop keeps only part of its tissue, the rest glass (a
    #: near-white, slightly noisy field, background for every tissue): a band along one
    #: side, the tissue in a corner, or the tissue in the middle, 20-75 % of the crop
    #: glass. Tiles at a biopsy's edge are like that, and with whole-tile statistics the
    #: glass changes what the network sees in the tissue (``benchmarks/glass_context.py``)
    glass_edge: float = 0.0
    #: take every normalisation's statistics and the pooled vector over each crop's
    #: tissue only (``slides.tissue_mask.statistics_mask``), as the whole-slide engine
    #: then does (``NetConfig.statistics`` "tissue", written to the checkpoint): the
    #: network learns on glass-edged images what it will see on them.  None = as the
    #: model fine-tuned was trained (a new model: over the whole crop)
    tissue_statistics: "bool | None" = None
    #: a model trained from scratch: the decoder's output channels every generated head
    #: reads (8 as the reference; ignored when fine-tuning, the parent's architecture stays)
    head_channels: int = 8

    def to_dict(self) -> dict:
        d = asdict(self)
        d["aug"] = asdict(self.aug)
        return d


def _device(name: str) -> torch.device:
    if name in ("auto", "", None):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def make_batches(samples: Sequence[Sample], batch_size: int, rng: np.random.Generator) -> list[list[int]]:
    """Tissue-homogeneous batches of sample indices, interleaved at random."""
    pools: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        pools.setdefault(s.tissue.id, []).append(i)
    batches = []
    for tid in sorted(pools):
        idx = np.array(pools[tid])
        rng.shuffle(idx)
        batches += [idx[j : j + batch_size].tolist() for j in range(0, len(idx), batch_size)]
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def _batch_tensors(samples, idx, cfg: TrainConfig, rng, train: bool, partners=None):
    """Images, masks (N x H x W: 1, 0, and -1 unknown in the other images of a mosaic)
    and ring weights of one batch of the labelled tissue (the reference loss)."""
    as_mosaic = train and cfg.mosaic > 0 and partners is not None and rng.random() < cfg.mosaic
    imgs, msks, wts = [], [], []
    for i in idx:
        s = samples[i]
        img = s.image.astype(np.float32) / 255.0
        msk = s.mask
        if train:
            img, msk = random_crop(img, msk, cfg.crop, rng)
            if as_mosaic:
                def label_of(j, tid=s.tissue.id):  # a partner labelled for this tissue keeps its mask
                    o = samples[j]
                    return o.mask.astype(np.int8) if o.tissue.id == tid else np.full(o.mask.shape, -1, np.int8)

                m = _mosaic(samples, label_of, img, msk.astype(np.int8), cfg, rng, partners[i])
                if m is not None:
                    img, msk = m
            if cfg.glass_edge > 0 and rng.random() < cfg.glass_edge:
                img, msk = glass_edge(img, np.asarray(msk), rng)
            if cfg.augment:
                img, msk = augment(img, msk, rng, cfg.aug)
        imgs.append(img)
        msks.append(msk)
        wts.append(ring_weight(np.asarray(msk) == 1))
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(np.stack(msks).astype(np.float32))
    w = torch.from_numpy(np.stack(wts))
    return x, y, w


def _stat_masks(x: torch.Tensor, mpps, model) -> "torch.Tensor | None":
    """Per-crop tissue masks (N x 1 x H x W) of a batch of images in [0, 1] for a model
    whose statistics are its tissue's; None otherwise or when every crop is all tissue."""
    if model.cfg.statistics != "tissue":
        return None
    from ..slides.tissue_mask import statistics_mask

    imgs = (x.permute(0, 2, 3, 1).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    ms = [statistics_mask(im, mpp) for im, mpp in zip(imgs, mpps)]
    if all(m is None for m in ms):
        return None
    full = np.ones(imgs.shape[1:3], bool)
    return torch.from_numpy(np.stack([full if m is None else m for m in ms]))[:, None].float()


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    if cfg.warmup_epochs and epoch < cfg.warmup_epochs:
        return cfg.lr * (epoch + 1) / cfg.warmup_epochs
    return cfg.lr * (1 - epoch / max(cfg.epochs, 1)) ** cfg.poly_power


def param_groups(model, cfg: TrainConfig) -> list[dict]:
    """Backbone, per-(tissue, scale) heads and the image-dependent controller as separate
    groups, each with its own learning-rate multiplier (``lr_mult``); heads without decay."""
    groups = {"backbone": [], "heads": [], "controller": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in ("controller_pair_bias", "controller_bias"):
            groups["heads"].append(p)
        elif name == "controller_weight":
            groups["controller"].append(p)
        else:
            groups["backbone"].append(p)
    mult = {"backbone": 1.0, "heads": cfg.head_lr_mult, "controller": cfg.controller_lr_mult}
    decay = {"backbone": cfg.weight_decay, "heads": 0.0, "controller": cfg.weight_decay}
    return [{"params": ps, "name": k, "lr_mult": mult[k], "lr": cfg.lr * mult[k], "weight_decay": decay[k]}
            for k, ps in groups.items() if ps]


def _make_optimizer(model, cfg: TrainConfig):
    groups = param_groups(model, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.99, nesterov=True, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r} (use 'sgd' or 'adamw')")


def autocast_for(dev: torch.device, enabled: bool = True):
    """bf16 autocast where it pays (CUDA with bf16, fast-bf16 CPUs), otherwise a no-op context."""
    if enabled and dev.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if enabled and dev.type == "cpu" and cpu_has_fast_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return torch.autocast(dev.type if dev.type in ("cpu", "cuda") else "cpu", enabled=False)


def make_balanced_batches(samples: Sequence[Sample], batch_size: int, rng: np.random.Generator) -> list[list[int]]:
    """Tissue-homogeneous batches, the same number for every tissue, interleaved at random.

    Every tissue gets ``ceil(median pool size / batch_size)`` batches; a smaller pool is
    cycled (reshuffled each cycle), a larger one is sampled without repeats."""
    pools: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        pools.setdefault(s.tissue.id, []).append(i)
    n_batches = max(1, math.ceil(float(np.median([len(v) for v in pools.values()])) / batch_size))
    batches = []
    for tid in sorted(pools):
        need = n_batches * batch_size
        seq: list[int] = []
        while len(seq) < need:
            idx = np.array(pools[tid])
            rng.shuffle(idx)
            seq += idx.tolist()
        seq = seq[:need]
        batches += [seq[j : j + batch_size] for j in range(0, need, batch_size)]
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def steps_per_epoch(samples: Sequence[Sample], cfg: TrainConfig) -> int:
    """How many optimiser steps one epoch of :func:`train` takes (for progress bars)."""
    counts: dict[int, int] = {}
    for s in samples:
        counts[s.tissue.id] = counts.get(s.tissue.id, 0) + 1
    if not counts:
        return 0
    n_neg = 0
    if cfg.cross_scale_negatives:
        heads = {t.name for s in samples for t in TISSUES if t.magnification != s.tissue.magnification
                 and MIN_FACTOR <= t.magnification / s.tissue.magnification <= MAX_FACTOR and exclusive(s.tissue, t)}
        n_neg = len(heads) * cfg.cross_scale_negatives
    if cfg.balanced:
        return n_neg + len(counts) * max(1, math.ceil(float(np.median(list(counts.values()))) / cfg.batch_size))
    return n_neg + sum(-(-n // cfg.batch_size) for n in counts.values())


def _negative_batch(negs, idx, cfg: TrainConfig, rng):
    """Images and targets (N x 1 x H x W: 0 on the excluded structure, -1 elsewhere) of
    one batch of cross-magnification negatives, cropped to a common size."""
    side = min(cfg.crop, *(min(negs[i].target.shape) for i in idx))
    imgs, ys = [], []
    for i in idx:
        n = negs[i]
        # the crop always holds part of the excluded structure (its only known pixels)
        img, lab = object_crop(n.image.astype(np.float32) / 255.0, n.target, side, rng, n.target == 0, 1.0)
        if cfg.augment:
            img, lab = augment(img, lab, rng, cfg.aug)
        imgs.append(img)
        ys.append(lab[None])
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    return x, torch.from_numpy(np.ascontiguousarray(np.stack(ys)))


def _mosaic_partners(samples, i: int) -> list[int]:
    """Other training images that may share a mosaic with sample ``i``: its magnification,
    its stain where the pool has other images of it."""
    s = samples[i]
    same = [j for j, o in enumerate(samples) if j != i and o.tissue.magnification == s.tissue.magnification]
    stain = [j for j in same if samples[j].stain == s.stain] if s.stain else []
    return stain or same


def _mosaic(samples, label_of, img, lab, cfg: TrainConfig, rng, partners):
    """A crop (``img``, ``lab``: crop x crop [x T], -1 unknown) in a random quadrant of a
    2 x 2 mosaic; the other quadrants are uniform crops of ``partners`` with the labels
    ``label_of(j)`` gives them. None when there is no partner."""
    c = cfg.crop
    out_img = np.empty((2 * c, 2 * c, 3), np.float32)
    out_lab = np.full((2 * c, 2 * c) + lab.shape[2:], -1, np.int8)
    mine = int(rng.integers(4))
    for q in range(4):
        y0, x0 = (q // 2) * c, (q % 2) * c
        if q == mine:
            qi, ql = img, lab
        else:
            if cfg.mosaic_glass > 0 and rng.random() < cfg.mosaic_glass:
                qi = _glass((c, c, 3), rng)
                ql = np.zeros((c, c) + lab.shape[2:], np.int8)  # glass: background for every head
            else:
                if not partners:
                    return None
                j = partners[int(rng.integers(len(partners)))]
                qi, ql = object_crop(samples[j].image.astype(np.float32) / 255.0, label_of(j), c, rng, None, 0.0)
        out_img[y0 : y0 + c, x0 : x0 + c] = qi
        out_lab[y0 : y0 + c, x0 : x0 + c] = ql
    return out_img, out_lab


def _glass(shape, rng) -> np.ndarray:
    """A near-white, slightly noisy field of glass (H x W x 3 in [0, 1])."""
    level = rng.uniform(0.92, 0.975)
    return np.clip(level + rng.normal(0.0, 0.008, shape), 0.0, 1.0).astype(np.float32)


def glass_edge(img: np.ndarray, lab: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """``img`` (H x W x 3 in [0, 1]) and its labels (H x W [x T]) with 20-75 % of the
    crop turned to glass: a band along one side, everything but a corner, or a frame
    around the middle. The tissue left keeps its place and its labels; glass is
    background (0) for every column. Returns new arrays."""
    h, w = img.shape[:2]
    f = rng.uniform(0.2, 0.75)
    keep = np.zeros((h, w), bool)
    layout = int(rng.integers(3))
    if layout == 0:  # a band of glass along one side
        side = int(rng.integers(4))
        if side < 2:
            b = int(round(f * h))
            keep[b:] = True
        else:
            b = int(round(f * w))
            keep[:, b:] = True
        if side % 2:
            keep = keep[::-1, ::-1].copy()
    else:
        th, tw = max(1, int(round(np.sqrt(1 - f) * h))), max(1, int(round(np.sqrt(1 - f) * w)))
        if layout == 1:  # the tissue in a corner
            y0 = 0 if rng.random() < 0.5 else h - th
            x0 = 0 if rng.random() < 0.5 else w - tw
        else:  # the tissue in the middle, glass all round
            y0, x0 = int(rng.integers(1, max(2, h - th))), int(rng.integers(1, max(2, w - tw)))
        keep[y0 : y0 + th, x0 : x0 + tw] = True
    out = np.where(keep[..., None], img, _glass(img.shape, rng)).astype(np.float32)
    k = keep.reshape(keep.shape + (1,) * (lab.ndim - 2))
    lab = np.where(k, lab, np.zeros((), lab.dtype)).astype(lab.dtype)
    return out, lab


def _target_batch(samples, targets, idx, cfg: TrainConfig, rng, partners=None):
    """Images, per-tissue targets (N x T x H x W, -1 unknown) and ring weights for one batch.

    With probability ``cfg.mosaic`` the batch is one of 2 x 2 mosaics (:func:`_mosaic`;
    ``partners``: sample index -> :func:`_mosaic_partners`).
    Returns x, y, w and the tissue ids of the T columns (the labelled tissue first)."""
    primary = samples[idx[0]].tissue.id
    tids = [primary] + sorted({k for i in idx for k in targets[i] if k != primary})
    as_mosaic = cfg.mosaic > 0 and rng.random() < cfg.mosaic
    imgs, ys = [], []
    for i in idx:
        s = samples[i]
        img = s.image.astype(np.float32) / 255.0
        lab = np.stack([targets[i].get(t, np.full(s.mask.shape, -1, np.int8)) for t in tids], axis=-1)
        img, lab = object_crop(img, lab, cfg.crop, rng, lab[..., 0] == 1, cfg.object_crop)
        if as_mosaic:
            pool = partners[i] if partners is not None else _mosaic_partners(samples, i)
            def label_of(j):
                return np.stack([targets[j].get(t, np.full(samples[j].mask.shape, -1, np.int8)) for t in tids], axis=-1)

            m = _mosaic(samples, label_of, img, lab, cfg, rng, pool)
            if m is None:  # the only image of its magnification: no mosaic for this batch
                return _target_batch(samples, targets, idx, replace(cfg, mosaic=0.0), rng)
            img, lab = m
        if cfg.glass_edge > 0 and rng.random() < cfg.glass_edge:
            img, lab = glass_edge(img, lab, rng)
        if cfg.augment:
            img, lab = augment(img, lab, rng, cfg.aug)
        imgs.append(img)
        ys.append(lab)
    y = np.stack(ys).transpose(0, 3, 1, 2)  # N x T x H x W
    w = np.stack([[ring_weight(y[n, j] == 1) for j in range(y.shape[1])] for n in range(y.shape[0])])
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    return x, torch.from_numpy(np.ascontiguousarray(y)), torch.from_numpy(w), tids


def _set_frozen(model, freeze: bool):
    """Freeze the encoder (stem, encoder stages, fusion); decoder, controller stay trainable."""
    bb = model.backbone
    for mod in (bb.stem, bb.encoder, bb.fusion, bb.gap_norm):
        for p in mod.parameters():
            p.requires_grad_(not freeze)


@torch.inference_mode()
def predict_samples(ckpt: Checkpoint, samples: Sequence[Sample], batch_size: int = 8, device="cpu") -> list[np.ndarray]:
    """Foreground masks for each sample with its own tissue's head (full patches), cut
    at the checkpoint's threshold for that tissue (0.5 unless calibrated)."""
    from .calibrate import probability_maps

    probs = probability_maps(ckpt, samples, batch_size=batch_size, device=_device(device))
    return [p > ckpt.threshold(s.tissue.name) for p, s in zip(probs, samples)]


def _pad_to(x: torch.Tensor, d: int):
    h, w = x.shape[-2:]
    ph, pw = (-h) % d, (-w) % d
    if ph or pw:
        x = torch.nn.functional.pad(x, (0, pw, 0, ph), mode="reflect")
    return x, (h, w)


def evaluate_samples(ckpt: Checkpoint, samples: Sequence[Sample], device="cpu", batch_size: int = 8) -> tuple[list[dict], dict]:
    """Per-sample rows (tissue, stain, dice, hd_um, hd95_um, msd_um) and their summary.

    Distances are in microns at each tissue's own pixel size (its magnification).
    """
    samples = [s if s.image is not None else load_arrays([s])[0] for s in samples]
    preds = predict_samples(ckpt, samples, batch_size=batch_size, device=device)
    rows = []
    for s, p in zip(samples, preds):
        sc = segmentation_scores(p, s.mask, s.tissue.mpp)
        rows.append({"tissue": s.tissue.name, "stain": s.stain, "image": str(s.image_path), **sc})
    return rows, summarize(rows)


def _save_state(state_dir: Path, model, optim, meta: dict, best_state: dict | None):
    from safetensors.torch import save_file

    state_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    osd = optim.state_dict()
    for pid, st in osd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v.detach().cpu().contiguous().reshape(v.shape)
    if best_state is not None:
        tensors.update({f"best.{k}": v.contiguous() for k, v in best_state.items()})
    tmp = state_dir / ".state.safetensors.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(state_dir / "state.safetensors")
    meta = dict(meta, param_groups=[{k: v for k, v in g.items() if k != "params"} for g in osd["param_groups"]])
    atomic_write_bytes(state_dir / "state.json", json.dumps(meta, indent=2).encode())


def _load_state(state_dir: Path, model, optim):
    from safetensors.torch import load_file

    meta = json.loads((state_dir / "state.json").read_text())
    t = load_file(str(state_dir / "state.safetensors"))
    model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
    osd = optim.state_dict()
    st: dict = {}
    for k, v in t.items():
        if k.startswith("optim."):
            _, pid, name = k.split(".", 2)
            st.setdefault(int(pid), {})[name] = v
    osd["state"] = st
    for g, saved in zip(osd["param_groups"], meta.get("param_groups", [])):
        g.update({k: v for k, v in saved.items() if k != "params"})
    optim.load_state_dict(osd)
    best = {k[5:]: v for k, v in t.items() if k.startswith("best.")} or None
    return meta, best


def train(
    train_samples: Sequence[Sample],
    val_samples: Sequence[Sample],
    out_path: "str | Path | None",
    cfg: TrainConfig | None = None,
    *,
    init: Checkpoint | None = None,
    tissues: Sequence[Tissue] = TISSUES,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    state_dir: "str | Path | None" = None,
    provenance: dict | None = None,
    save_dtype: torch.dtype = torch.float32,
) -> tuple[Checkpoint, dict]:
    """Train (or fine-tune ``init``) and write the best model to ``out_path``.

    Returns the best :class:`Checkpoint` (already saved when ``out_path`` is given)
    and a history dict.  Raises :class:`TrainingCancelled` if ``should_stop``
    returned True, :class:`TrainingError` after too many non-finite steps; neither
    writes ``out_path``.
    """
    cfg = cfg or TrainConfig()
    out_path = Path(out_path) if out_path else None
    if out_path is not None and (out_path.exists() or out_path.with_suffix(".json").exists()):
        raise FileExistsError(f"{out_path} exists; checkpoints are never overwritten, choose a new name")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = _device(cfg.device)
    train_samples = [s for s in train_samples]
    val_samples = [s for s in val_samples]
    for group in (train_samples, val_samples):
        missing = [s for s in group if s.image is None]
        if missing:
            load_arrays(missing)
    if not train_samples:
        raise TrainingError("no training samples")

    if init is not None:
        ckpt = init
    else:
        from ..model.network import NetConfig

        ckpt = new_checkpoint(tissues, cfg=NetConfig(n_tissues=len(tissues), head_channels=cfg.head_channels,
                                                     tissue_scales=tuple(t.scale_id for t in tissues)), seed=cfg.seed)
    # the anatomy relations: the checkpoint's tissues plus the registry's (an older
    # checkpoint's tissue definitions may lack some)
    rel_tissues = with_registry_relations(ckpt.tissues)
    if cfg.augment and cfg.aug.p_lab_transfer > 0 and cfg.aug.lab_stats is None:
        # colour transfer draws its targets from the training images' own colours
        cfg = replace(cfg, aug=replace(cfg.aug, lab_stats=lab_statistics([s.image for s in train_samples])))
    targets = build_targets(train_samples, rel_tissues) if cfg.relations else None
    negs = cross_scale_negatives(train_samples, rel_tissues) if cfg.cross_scale_negatives else []
    partners = ([_mosaic_partners(train_samples, i) for i in range(len(train_samples))]
                if cfg.mosaic > 0 else None)
    model = ckpt.model.to(dev)
    if cfg.tissue_statistics is not None:
        model.cfg.statistics = "tissue" if cfg.tissue_statistics else "tile"
    _set_frozen(model, cfg.freeze_encoder)
    optim = _make_optimizer(model, cfg)
    history: dict = {"epochs": [], "nonfinite_steps": 0, "config": cfg.to_dict()}
    best_score, best_state, best_epoch, start_epoch = -math.inf, None, -1, 0
    state_dir = Path(state_dir) if state_dir else None
    if state_dir is not None and (state_dir / "state.json").exists():
        meta, best_state = _load_state(state_dir, model, optim)
        start_epoch = meta["epoch"] + 1
        best_score, best_epoch = meta["best_score"], meta["best_epoch"]
        history = meta["history"]
    t0 = time.perf_counter()
    nonfinite = history.get("nonfinite_steps", 0)
    if init is not None and val_samples and start_epoch == 0:
        # a fine-tune must never hand back weights worse than those it started from:
        # the starting model is scored first and counts as "epoch 0" in the selection
        if should_stop and should_stop():
            raise TrainingCancelled("cancelled before training; no checkpoint written")
        _, summ0 = evaluate_samples(ckpt, val_samples, device=dev)
        model.train()
        if math.isfinite(summ0["mean_dice"]):
            best_score, best_epoch = summ0["mean_dice"], 0
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        history["epochs"].append({"epoch": 0, "val_mean_dice": summ0["mean_dice"],
                                  "val_dice": {t: v["dice"] for t, v in summ0["per_tissue"].items()},
                                  "best_epoch": best_epoch, "time_s": 0.0})

    def stop() -> bool:
        return bool(should_stop and should_stop())

    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        rng = np.random.default_rng([cfg.seed, epoch])
        torch.manual_seed(cfg.seed * 100003 + epoch)
        for g in optim.param_groups:
            g["lr"] = lr_at(cfg, epoch) * g.get("lr_mult", 1.0)
        batches = (make_balanced_batches if cfg.balanced else make_batches)(train_samples, cfg.batch_size, rng)
        if negs:  # interleave the negative batches (marked by a None first entry)
            batches = batches + [[None, *b] for b in negative_batches(negs, cfg.batch_size, cfg.cross_scale_negatives, rng)]
            batches = [batches[i] for i in rng.permutation(len(batches))]
        losses = []
        for step, idx in enumerate(batches):
            if stop():
                raise TrainingCancelled(f"cancelled in epoch {epoch + 1}, step {step + 1}; no checkpoint written")
            if idx[0] is None:
                x, y = _negative_batch(negs, idx[1:], cfg, rng)
                if not bool((y >= 0).any()):  # nothing known in these crops (augmentation moved it out)
                    continue
                sm = _stat_masks(x, [negs[i].tissue.mpp for i in idx[1:]], model)
                x, y = ckpt.normalize(x).to(dev), y.to(dev)
                with autocast_for(dev, cfg.amp):
                    logits = model.heads(model.features(x, sm), [negs[idx[1]].tissue.id])
                loss = cfg.negative_weight * partial_label_loss(logits, y, None, primary=0)
            elif cfg.relations:
                x, y, w, tids = _target_batch(train_samples, targets, idx, cfg, rng, partners)
                sm = _stat_masks(x, [train_samples[i].tissue.mpp for i in idx], model)
                x = ckpt.normalize(x).to(dev)
                y, w = y.to(dev), w.to(dev)
                with autocast_for(dev, cfg.amp):
                    logits = model.heads(model.features(x, sm), tids)
                loss = partial_label_loss(logits, y, w, primary=0, derived_weight=cfg.derived_weight)
            else:
                x, y, w = _batch_tensors(train_samples, idx, cfg, rng, train=True, partners=partners)
                sm = _stat_masks(x, [train_samples[i].tissue.mpp for i in idx], model)
                x = ckpt.normalize(x).to(dev)
                y, w = y.to(dev), w.to(dev)
                tid = train_samples[idx[0]].tissue.id
                with autocast_for(dev, cfg.amp):
                    logits = model.heads(model.features(x, sm), [tid])[:, 0]
                loss = dice_bce_loss(logits, y, w)
            optim.zero_grad(set_to_none=True)
            ok = bool(torch.isfinite(loss))
            if ok:
                loss.backward()
                ok = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in model.parameters())
            if not ok:
                nonfinite += 1
                optim.zero_grad(set_to_none=True)
                if nonfinite > cfg.max_nonfinite:
                    raise TrainingError(
                        f"aborted: {nonfinite} steps had a non-finite loss or gradient (limit {cfg.max_nonfinite}); "
                        "lower the learning rate or check the data; no checkpoint written"
                    )
                continue
            optim.step()
            losses.append(float(loss.detach()))
            if on_progress:
                on_progress({"phase": "train", "epoch": epoch + 1, "epochs": cfg.epochs, "step": step + 1,
                             "steps": len(batches), "loss": losses[-1]})
        rec = {"epoch": epoch + 1, "lr": lr_at(cfg, epoch), "loss": float(np.mean(losses)) if losses else float("nan"),
               "time_s": time.perf_counter() - t0}
        last = epoch == cfg.epochs - 1
        if val_samples and ((epoch + 1) % cfg.val_every == 0 or last):
            if stop():
                raise TrainingCancelled(f"cancelled after epoch {epoch + 1}; no checkpoint written")
            _, summ = evaluate_samples(ckpt, val_samples, device=dev)
            model.train()
            rec["val_mean_dice"] = summ["mean_dice"]
            rec["val_dice"] = {t: v["dice"] for t, v in summ["per_tissue"].items()}
            score = summ["mean_dice"]
        else:
            # without validation data the last epoch is kept
            score = float(epoch) if not val_samples else None
        if score is not None and math.isfinite(score) and score > best_score and all_finite(model):
            best_score, best_epoch = score, epoch + 1
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        rec["best_epoch"] = best_epoch
        history["epochs"].append(rec)
        history["nonfinite_steps"] = nonfinite
        if on_progress:
            on_progress({"phase": "epoch", **rec, "epochs": cfg.epochs})
        if state_dir is not None:
            _save_state(state_dir, model, optim, {"epoch": epoch, "best_score": best_score, "best_epoch": best_epoch,
                                                  "history": history}, best_state)
    if best_state is None:
        raise TrainingError("no finite model was produced; no checkpoint written")
    model.load_state_dict(best_state)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    history["best_epoch"] = best_epoch
    history["best_val_mean_dice"] = best_score if val_samples else None
    history["wall_time_s"] = time.perf_counter() - t0
    prov = {
        "epochs": cfg.epochs,
        "best_epoch": best_epoch,
        "seed": cfg.seed,
        "train_config": cfg.to_dict(),
        "n_train": len(train_samples),
        "n_val": len(val_samples),
        "parent": ckpt.version if init is not None else None,
        "wall_time_s": round(history["wall_time_s"], 1),
        "nonfinite_steps": nonfinite,
        **({"cross_scale_negatives": negatives_summary(negs)} if negs else {}),
        **(provenance or {}),
    }
    metrics = {"val_mean_dice": best_score} if val_samples else {}
    if val_samples:
        metrics["val_dice"] = next((r["val_dice"] for r in history["epochs"] if r["epoch"] == best_epoch), {})
    result = Checkpoint(model=model.cpu(), tissues=tuple(ckpt.tissues), normalization=ckpt.normalization,
                        provenance=prov, metrics=metrics, thresholds=dict(ckpt.thresholds) if init is not None else {})
    if cfg.calibrate:
        if stop():
            raise TrainingCancelled("cancelled before calibration; no checkpoint written")
        if on_progress:
            on_progress({"phase": "calibrate", "samples": len(train_samples) + len(val_samples)})
        from .calibrate import calibrate_thresholds

        th, table = calibrate_thresholds(result, list(train_samples) + list(val_samples))
        result.thresholds = th
        prov["calibration"] = {"samples": "train + validation", "n": len(train_samples) + len(val_samples),
                               "dice_by_threshold": {t: {str(k): round(v, 4) for k, v in row.items()}
                                                     for t, row in table.items()}}
        history["thresholds"] = th
    if out_path is not None:
        save_checkpoint(model, out_path, ckpt.tissues, normalization=ckpt.normalization, provenance=prov,
                        metrics=metrics, dtype=save_dtype, thresholds=result.thresholds)
        from ..model.checkpoint import load_checkpoint

        result = load_checkpoint(out_path)
    return result, history
