"""The baselines the Omni-Seg paper compares against, on Omni-Seg's own footing.

Every baseline uses the same residual U-Net :class:`~..model.network.Backbone` as
Omni-Seg (its 8-channel decoder features); only the part after the backbone and the
loss differ.  They train on exactly the same data stream as
:func:`.loop.train`: the same tissue-homogeneous batches (:func:`.loop.make_batches`),
the same random crops and augmentation (the loop's own batch builder, so with the
same seed every method sees the same pixels in the same order), the same boundary
ring weight, optimiser, poly learning-rate schedule (:func:`.loop.lr_at`), epochs
and model selection on mean validation Dice.

``multi_network`` (one binary U-Net per tissue)
    ``n_tissues`` x (Backbone + 1x1 conv 8 -> 2).  A batch labelled for tissue c
    trains network c only, with :func:`.losses.dice_bce_loss`.  One optimiser holds
    all six networks; parameters without a gradient in a step are skipped by SGD and
    AdamW alike, so this is the same as six independent optimisers, each stepping
    on its own tissue's batches.  Each network is selected on its own tissue's
    validation Dice.  Prediction for c: network c, foreground where logit 1 > logit 0.

``multihead_tal`` (multi-head with the target adaptive loss, Fang & Yan 2020)
    Backbone + 1x1 conv 8 -> 1 + n_tissues, softmax over background + tissues.  On
    an image labelled for c the probabilities of background and of every other
    tissue are merged into "not c", so the binary pair is (1 - p_c, p_c), whose
    logit is ``z = l_c - logsumexp_{k != c} l_k`` (:func:`merged_logit`).  Loss:
    :func:`.losses.dice_bce_loss` on the pair logits ``(-z, z)``, which is exactly
    the ring-weighted binary cross-entropy of p_c (the TAL term) plus the same
    two-channel soft Dice Omni-Seg uses (:func:`tal_loss`).  Prediction for c:
    ``p_c > 0.5``, i.e. the decision of the merged binary pair the loss trains.

``multiclass`` (one softmax over all tissues, Gonzalez et al. 2018)
    Same network as ``multihead_tal``.  On an image labelled for c the target is
    class c on the mask and background everywhere else: the other tissues, though
    unlabelled, are treated as background (:func:`multiclass_target`).  Loss:
    ring-weighted softmax cross-entropy over all classes plus the same soft Dice
    on the pair (1 - p_c, p_c) (:func:`multiclass_loss`).  Prediction for c:
    ``argmax == c``.

Note that a softmax gives each pixel one class, so the two single-network
baselines cannot mark a pixel as both glomerular unit and glomerular tuft (the tuft
lies inside the unit); that is part of what the paper's comparison shows.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..model.checkpoint import all_finite
from ..model.network import HEAD_CHANNELS, Backbone, NetConfig, fg_probability, foreground
from ..tissues import TISSUES, Tissue
from .data import Sample, load_arrays
from .loop import TrainConfig, TrainingError, _batch_tensors, _device, _make_optimizer, _pad_to, lr_at, make_batches
from .losses import dice_bce_loss
from .metrics import segmentation_scores, summarize

ProgressFn = Callable[[dict], None]


# --------------------------------------------------------------------------- networks
class BinaryUNet(nn.Module):
    """One tissue's network: Backbone + 1x1 conv 8 -> 2 (background, foreground logits)."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.head = nn.Conv2d(cfg.head_channels, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)[0])


class MultiNetwork(nn.Module):
    """``n_tissues`` independent :class:`BinaryUNet` s, one per tissue."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.cfg = cfg
        self.nets = nn.ModuleList([BinaryUNet(cfg) for _ in range(cfg.n_tissues)])

    def forward(self, x: torch.Tensor, tissue: int) -> torch.Tensor:
        """Logits N x 2 x H x W of tissue ``tissue``'s network."""
        return self.nets[tissue](x)


class MultiHeadNet(nn.Module):
    """Backbone + 1x1 conv 8 -> 1 + n_tissues: channel 0 background, channel 1 + c tissue c."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.head = nn.Conv2d(cfg.head_channels, 1 + cfg.n_tissues, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)[0])


# --------------------------------------------------------------------------- losses
def soft_dice_loss(p_fg: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                   smooth: float = 1.0) -> torch.Tensor:
    """The Dice half of :func:`.losses.dice_bce_loss` for a foreground probability.

    Mean over the pair (background = 1 - p_fg, foreground = p_fg) of 1 - soft Dice,
    per image, ring weight in all sums, then averaged over the batch.
    """
    t = target.float()
    p = torch.stack([1.0 - p_fg, p_fg], dim=1)
    t = torch.stack([1.0 - t, t], dim=1)
    w = torch.ones_like(t[:, :1]) if weight is None else weight.float().unsqueeze(1)
    inter = (p * t * w).sum((2, 3))
    denom = (p * w).sum((2, 3)) + (t * w).sum((2, 3))
    return (1.0 - (2 * inter + smooth) / (denom + smooth)).mean()


def merged_logit(logits: torch.Tensor, tissue: int) -> torch.Tensor:
    """Logit of tissue c against "not c" (background and all other tissues merged).

    ``logits`` N x (1 + T) x H x W (channel 0 background); returns N x H x W
    ``z = l_{1+c} - logsumexp_{k != 1+c} l_k``, so ``sigmoid(z) = p_c`` of the softmax.
    """
    ch = 1 + int(tissue)
    others = torch.cat([logits[:, :ch], logits[:, ch + 1:]], dim=1)
    return logits[:, ch] - torch.logsumexp(others, dim=1)


def tal_loss(logits: torch.Tensor, target: torch.Tensor, tissue: int, weight: torch.Tensor | None = None,
             dice: bool = True) -> torch.Tensor:
    """Target adaptive loss for images labelled for ``tissue`` only.

    Binary cross-entropy of p_c against the mask, where the "not c" probability is
    background plus every other tissue (ring-weighted mean over pixels).  With
    ``dice`` (the default, used in the comparison) the same soft Dice as Omni-Seg's
    loss is added: the result is ``dice_bce_loss`` on the pair logits ``(-z, z)``.
    """
    z = merged_logit(logits.float(), tissue)
    if dice:
        return dice_bce_loss(torch.stack([-z, z], dim=1), target, weight)
    w = None if weight is None else weight.float()
    return F.binary_cross_entropy_with_logits(z, target.float(), weight=w, reduction="mean")


def multiclass_target(mask: torch.Tensor, tissue: int) -> torch.Tensor:
    """Class map for an image labelled for ``tissue``: 1 + tissue on the mask, 0 elsewhere.

    Unlabelled tissues in the image become background (class 0): the multi-class
    baseline's assumption, which partial labels violate.
    """
    return mask.bool().long() * (1 + int(tissue))


def multiclass_loss(logits: torch.Tensor, target: torch.Tensor, tissue: int,
                    weight: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax cross-entropy over background + all tissues (ring-weighted pixel mean)
    plus the soft Dice of the labelled tissue's probability (as in Omni-Seg's loss)."""
    logits = logits.float()
    ce = F.cross_entropy(logits, multiclass_target(target, tissue), reduction="none")
    ce = (ce * weight.float()).mean() if weight is not None else ce.mean()
    p_c = torch.softmax(logits, dim=1)[:, 1 + int(tissue)]
    return ce + soft_dice_loss(p_c, target, weight)


# --------------------------------------------------------------------------- methods
class Baseline:
    """A baseline: how to build its network, its loss for a batch labelled for one
    tissue, and its binary decision for a tissue."""

    name = ""
    label = ""
    #: select each tissue's sub-network on its own validation Dice (multi-network)
    per_tissue_selection = False

    def build(self, cfg: NetConfig) -> nn.Module:
        raise NotImplementedError

    def loss(self, model: nn.Module, x, y, w, tissue: int) -> torch.Tensor:
        raise NotImplementedError

    def predict(self, model: nn.Module, x: torch.Tensor, tissue: int) -> torch.Tensor:
        """Binary mask N x H x W of ``tissue``."""
        raise NotImplementedError

    def predict_all(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Binary masks N x T x H x W of every tissue (what a slide-level run needs)."""
        raise NotImplementedError

    @property
    def has_probability(self) -> bool:
        """True when the decision is a cut of one probability (so it can be calibrated)."""
        return type(self).probability is not Baseline.probability

    def probability(self, model: nn.Module, x: torch.Tensor, tissue: int) -> torch.Tensor | None:
        """Foreground probability N x H x W of ``tissue`` whose cut at 0.5 is :meth:`predict`,
        or None where the decision is not a cut of one probability (an argmax)."""
        return None

    def submodule(self, model: nn.Module, tissue: int) -> nn.Module:
        """The part of the model selected independently for ``tissue`` (per-tissue selection)."""
        return model


class MultiNetworkBaseline(Baseline):
    name = "multi_network"
    label = "Multi-network (6 binary U-Nets)"
    per_tissue_selection = True

    def build(self, cfg):
        return MultiNetwork(cfg)

    def loss(self, model, x, y, w, tissue):
        return dice_bce_loss(model(x, tissue), y, w)

    def predict(self, model, x, tissue):
        return foreground(model(x, tissue))

    def probability(self, model, x, tissue):
        return fg_probability(model(x, tissue).float())

    def predict_all(self, model, x):
        return torch.stack([foreground(model(x, t)) for t in range(model.cfg.n_tissues)], dim=1)

    def submodule(self, model, tissue):
        return model.nets[tissue]


class TALBaseline(Baseline):
    name = "multihead_tal"
    label = "Multi-head + TAL"

    def build(self, cfg):
        return MultiHeadNet(cfg)

    def loss(self, model, x, y, w, tissue):
        return tal_loss(model(x), y, tissue, w)

    def predict(self, model, x, tissue):
        return merged_logit(model(x), tissue) > 0  # p_c > 0.5

    def probability(self, model, x, tissue):
        return torch.sigmoid(merged_logit(model(x).float(), tissue))

    def predict_all(self, model, x):
        p = torch.softmax(model(x), dim=1)[:, 1:]
        return p > 0.5


class MultiClassBaseline(Baseline):
    name = "multiclass"
    label = "Multi-class softmax"

    def build(self, cfg):
        return MultiHeadNet(cfg)

    def loss(self, model, x, y, w, tissue):
        return multiclass_loss(model(x), y, tissue, w)

    def predict(self, model, x, tissue):
        return model(x).argmax(dim=1) == 1 + tissue

    def predict_all(self, model, x):
        cls = model(x).argmax(dim=1, keepdim=True)
        ids = torch.arange(1, 1 + model.cfg.n_tissues, device=cls.device).view(1, -1, 1, 1)
        return cls == ids


BASELINES: dict[str, Baseline] = {b.name: b for b in (MultiNetworkBaseline(), TALBaseline(), MultiClassBaseline())}


def get_baseline(name: str) -> Baseline:
    try:
        return BASELINES[name]
    except KeyError:
        raise KeyError(f"unknown baseline {name!r}; choose from {sorted(BASELINES)}") from None


def net_config(tissues: Sequence[Tissue] = TISSUES, head_channels: int = HEAD_CHANNELS) -> NetConfig:
    """The architecture Omni-Seg gets for these tissues (as :func:`new_checkpoint` builds it);
    ``head_channels``: the decoder's output channels, which every head reads."""
    return NetConfig(n_tissues=len(tissues), tissue_scales=tuple(t.scale_id for t in tissues),
                     head_channels=head_channels)


def build_model(method: "str | Baseline", tissues: Sequence[Tissue] = TISSUES, seed: int | None = None,
                head_channels: int = HEAD_CHANNELS) -> nn.Module:
    """A freshly initialised baseline network (seeded like :func:`new_checkpoint`)."""
    m = get_baseline(method) if isinstance(method, str) else method
    if seed is not None:
        torch.manual_seed(seed)
    return m.build(net_config(tissues, head_channels))


# --------------------------------------------------------------------------- evaluation
@torch.inference_mode()
def predict_baseline(method: "str | Baseline", model: nn.Module, samples: Sequence[Sample], batch_size: int = 8,
                     device="cpu", thresholds: dict | None = None, probabilities: bool = False) -> list[np.ndarray]:
    """Each sample's binary mask for its own tissue (full patches, reflect-padded to /16):
    the method's own decision, or its probability cut at ``thresholds[tissue name]``
    where given; with ``probabilities`` the probability maps themselves."""
    m = get_baseline(method) if isinstance(method, str) else method
    dev = _device(device)
    was_training = model.training
    model.to(dev).eval()
    out: list[np.ndarray | None] = [None] * len(samples)
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault((s.tissue.id, s.image.shape), []).append(i)
    for (tid, _), idxs in groups.items():
        for j in range(0, len(idxs), batch_size):
            chunk = idxs[j: j + batch_size]
            x = torch.from_numpy(np.stack([samples[i].image for i in chunk])).permute(0, 3, 1, 2).float() / 255.0
            x, (h, w) = _pad_to(x.to(dev), model.cfg.divisor)
            name = samples[idxs[0]].tissue.name
            if probabilities or (thresholds and name in thresholds):
                p = m.probability(model, x, tid)
                if p is None:
                    raise ValueError(f"{m.name}: its decision is not a cut of one probability")
                p = p[..., :h, :w]
                fg = (p if probabilities else p > thresholds[name]).cpu().numpy()
            else:
                fg = m.predict(model, x, tid)[..., :h, :w].cpu().numpy()
            for k, i in enumerate(chunk):
                out[i] = fg[k]
    model.train(was_training)
    return out  # type: ignore[return-value]


def evaluate_baseline(method: "str | Baseline", model: nn.Module, samples: Sequence[Sample], device="cpu",
                      batch_size: int = 8, thresholds: dict | None = None) -> tuple[list[dict], dict]:
    """Per-sample rows and their :func:`summarize` summary, like :func:`.loop.evaluate_samples`:
    foreground Dice and distances in microns at each tissue's own pixel size."""
    samples = [s if s.image is not None else load_arrays([s])[0] for s in samples]
    preds = predict_baseline(method, model, samples, batch_size=batch_size, device=device, thresholds=thresholds)
    rows = []
    for s, p in zip(samples, preds):
        rows.append({"tissue": s.tissue.name, "stain": s.stain, "image": str(s.image_path),
                     **segmentation_scores(p, s.mask, s.tissue.mpp)})
    return rows, summarize(rows)


def calibrate_baseline(method: "str | Baseline", model: nn.Module, samples: Sequence[Sample], *,
                       min_samples: int = 4, device="cpu") -> dict:
    """Per-tissue thresholds for a baseline, chosen exactly as :func:`.calibrate.calibrate_thresholds`
    chooses Omni-Seg's (best mean Dice on ``samples`` over the same grid; tissues with fewer
    than ``min_samples`` patches showing them keep 0.5); {} for a method whose decision is an argmax."""
    from .calibrate import GRID, calibration_counts, pick_thresholds, threshold_table

    m = get_baseline(method) if isinstance(method, str) else method
    if not m.has_probability:  # an argmax: nothing to cut
        return {}
    samples = [s if s.image is not None else load_arrays([s])[0] for s in samples]
    probs = predict_baseline(m, model, samples, device=device, probabilities=True)
    return pick_thresholds(threshold_table(probs, samples, GRID), calibration_counts(samples), min_samples)


# --------------------------------------------------------------------------- training
def _snapshot(module: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def train_baseline(
    method: "str | Baseline",
    train_samples: Sequence[Sample],
    val_samples: Sequence[Sample],
    cfg: TrainConfig | None = None,
    *,
    tissues: Sequence[Tissue] = TISSUES,
    on_progress: ProgressFn | None = None,
    per_tissue_selection: bool | None = None,
) -> tuple[nn.Module, dict]:
    """Train a baseline with Omni-Seg's recipe (see the module docstring).

    Per epoch: randomness from (seed, epoch) exactly as :func:`.loop.train` derives
    it, poly learning rate, tissue-homogeneous batches, crops + augmentation by the
    loop's batch builder.  A step with a non-finite loss or gradient is skipped;
    more than ``cfg.max_nonfinite`` raise :class:`TrainingError`.  Validation every
    ``cfg.val_every`` epochs and at the last: the model (or, for the multi-network,
    each tissue's network on its own tissue) with the best mean validation Dice is
    kept; without validation data, the last epoch.  ``per_tissue_selection`` overrides
    the method's own rule (False: the multi-network's six networks are kept together,
    at the epoch of best mean validation Dice, the rule Omni-Seg is selected by).
    Returns the selected model (in eval mode, on the CPU) and a history dict.
    """
    m = get_baseline(method) if isinstance(method, str) else method
    cfg = cfg or TrainConfig()
    if cfg.freeze_encoder:
        raise ValueError("freeze_encoder is for fine-tuning Omni-Seg; baselines train from scratch")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = _device(cfg.device)
    train_samples, val_samples = list(train_samples), list(val_samples)
    for group in (train_samples, val_samples):
        missing = [s for s in group if s.image is None]
        if missing:
            load_arrays(missing)
    if not train_samples:
        raise TrainingError("no training samples")

    model = build_model(m, tissues, seed=cfg.seed, head_channels=cfg.head_channels).to(dev)
    optim = _make_optimizer(model, cfg)
    # selection units: the whole model, or one network per tissue
    per_tissue = m.per_tissue_selection if per_tissue_selection is None else bool(per_tissue_selection)
    units = list(range(len(tissues))) if per_tissue else [None]
    best = {u: (-math.inf, -1, None) for u in units}  # score, epoch, state
    history: dict = {"method": m.name, "epochs": [], "nonfinite_steps": 0, "config": cfg.to_dict(),
                     "selection": "per tissue" if per_tissue else "mean"}
    nonfinite = 0
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        rng = np.random.default_rng([cfg.seed, epoch])
        torch.manual_seed(cfg.seed * 100003 + epoch)
        for g in optim.param_groups:
            g["lr"] = lr_at(cfg, epoch)
        batches = make_batches(train_samples, cfg.batch_size, rng)
        losses = []
        for step, idx in enumerate(batches):
            x, y, w = _batch_tensors(train_samples, idx, cfg, rng, train=True)
            x, y, w = x.to(dev), y.to(dev), w.to(dev)
            tid = train_samples[idx[0]].tissue.id
            loss = m.loss(model, x, y, w, tid)
            optim.zero_grad(set_to_none=True)
            ok = bool(torch.isfinite(loss))
            if ok:
                loss.backward()
                ok = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in model.parameters())
            if not ok:
                nonfinite += 1
                optim.zero_grad(set_to_none=True)
                if nonfinite > cfg.max_nonfinite:
                    raise TrainingError(f"{m.name}: aborted after {nonfinite} non-finite steps")
                continue
            optim.step()
            losses.append(float(loss.detach()))
        rec = {"epoch": epoch + 1, "lr": lr_at(cfg, epoch), "loss": float(np.mean(losses)) if losses else float("nan"),
               "time_s": time.perf_counter() - t0}
        last = epoch == cfg.epochs - 1
        scores: dict = {}
        if val_samples and ((epoch + 1) % cfg.val_every == 0 or last):
            _, summ = evaluate_baseline(m, model, val_samples, device=dev)
            rec["val_mean_dice"] = summ["mean_dice"]
            rec["val_dice"] = {t: v["dice"] for t, v in summ["per_tissue"].items()}
            if per_tissue:
                scores = {t.id: rec["val_dice"].get(t.name) for t in tissues}
                # a tissue without validation patches keeps its last epoch
                scores = {u: (float(epoch) if s is None else s) for u, s in scores.items()}
            else:
                scores = {None: summ["mean_dice"]}
        elif not val_samples:
            scores = {u: float(epoch) for u in units}
        if scores and all_finite(model):
            for u, s in scores.items():
                if math.isfinite(s) and s > best[u][0]:
                    best[u] = (s, epoch + 1, _snapshot(m.submodule(model, u) if u is not None else model))
        rec["best_epoch"] = {("all" if u is None else tissues[u].name): best[u][1] for u in units}
        history["epochs"].append(rec)
        if on_progress:
            on_progress({"phase": "epoch", "method": m.name, "epochs": cfg.epochs, **rec})
    history["nonfinite_steps"] = nonfinite
    if any(b[2] is None for b in best.values()):
        raise TrainingError(f"{m.name}: no finite model was produced")
    for u, (_, _, state) in best.items():
        (m.submodule(model, u) if u is not None else model).load_state_dict(state)
    history["best_epoch"] = {("all" if u is None else tissues[u].name): best[u][1] for u in units}
    history["best_val_score"] = {("all" if u is None else tissues[u].name): best[u][0] for u in units} if val_samples else None
    history["wall_time_s"] = time.perf_counter() - t0
    return model.cpu().eval(), history
