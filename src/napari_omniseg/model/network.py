"""The scale-aware Omni-Seg network.

A residual U-Net backbone (pre-activation blocks, GroupNorm(16), additive skips)
produces an 8-channel feature map and a 256-vector from the bottleneck.  A
controller turns that vector, the tissue and the scale into 162 numbers: the
weights and biases of a tiny 1x1-conv head 8 -> 8 -> 8 -> 2 applied to *that*
sample only.  Because only the controller and the head depend on the tissue, the
backbone runs once per patch and every tissue at that magnification reuses it:
``features`` is the expensive part, ``heads`` costs well under 0.1 % of it.

The controller is one 256 -> 162 matrix per (tissue, scale) pair plus a shared
bias.  That is exactly what a linear layer on the flattened outer product
feature x tissue-one-hot x scale-one-hot computes, without building the product.
We append a constant 1 to the feature vector before the outer product, which adds
one 162-vector per (tissue, scale) pair (3,888 parameters): each pair starts from
its own head, initialised like ordinary 1x1 convolutions, and the image features
modulate it.  Without that term every tissue's head is a linear function of the
image's pooled features alone, which trains poorly from a few dozen patches
(heads computed for unseen images collapse to "all background").
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

HEAD_CHANNELS = 8


def head_split(k: int = HEAD_CHANNELS) -> tuple[int, ...]:
    """Sizes of one generated head's parameters for ``k`` feature channels, weights
    first then biases: W1 (k x k), W2 (k x k), W3 (2 x k), b1, b2, b3."""
    return (k * k, k * k, 2 * k, k, k, 2)


#: the default head (8 channels): a 162-vector
HEAD_SPLIT = head_split(HEAD_CHANNELS)
N_HEAD_PARAMS = sum(HEAD_SPLIT)  # 162


@dataclass
class NetConfig:
    """Architecture hyper-parameters; stored in every checkpoint sidecar."""

    n_tissues: int = 6
    n_scales: int = 4
    widths: tuple[int, ...] = (32, 64, 128, 256, 256)
    blocks: tuple[int, ...] = (1, 2, 2, 2, 2)
    groups: int = 16
    head_channels: int = HEAD_CHANNELS
    in_channels: int = 3
    #: scale id of each tissue (its default magnification)
    tissue_scales: tuple[int, ...] = (1, 1, 0, 0, 1, 3)
    name: str = "omniseg-scale-aware"
    #: how the pooled 256-vector enters the controller: "none" (raw, as the reference),
    #: or "unit" (centred, scaled to unit length: independent of the tile size's effect
    #: on the feature magnitude, and small enough that the image can only modulate each
    #: pair's own head, not swamp it).  Sidecars written before this field load as "none".
    pool_norm: str = "unit"
    #: initialisation of a new model's controller: "uniform" (the reference's linear-layer
    #: scale) or "head" (image part zero, each (tissue, scale) pair's own head initialised
    #: as a He-initialised 1x1 conv stack, so every head starts as a working conv head)
    controller_init: str = "head"
    #: where each image's normalisation statistics and pooled vector come from when the
    #: model is used: "tile" (every pixel of the tile) or "tissue" (the pixels its tissue
    #: mask holds: the engine's tiles, evaluation patches and training crops alike; see
    #: ``TissueGroupNorm``).  A model is used as it was trained; sidecars written before
    #: this field load as "tile"
    statistics: str = "tile"
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("widths", "blocks", "tissue_scales"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "NetConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown architecture fields: {sorted(unknown)}")
        kw = dict(d)
        kw.setdefault("pool_norm", "none")  # older sidecars: the raw pooled vector
        kw.setdefault("controller_init", "uniform")
        kw.setdefault("statistics", "tile")
        for k in ("widths", "blocks", "tissue_scales"):
            if k in kw:
                kw[k] = tuple(int(v) for v in kw[k])
        return cls(**kw)

    @property
    def divisor(self) -> int:
        """Input sides must be multiples of this."""
        return 2 ** (len(self.widths) - 1)


class _StatMask(threading.local):
    """The tissue mask the statistics of one forward pass are taken over (per thread)."""

    mask: "torch.Tensor | None" = None  # N x 1 x H x W, 1 = tissue, at the input's resolution
    #: N booleans: the sample's mask covers every pixel (its statistics are the plain ones)
    full: "torch.Tensor | None" = None
    #: every sample has a partial mask (so the plain statistics need not be computed)
    all_partial: bool = False

    def __reduce__(self):  # copies and pickles of a model get a fresh, empty one
        return (_StatMask, ())

    def set(self, mask: "torch.Tensor | None") -> None:
        if mask is not None:
            full = mask.flatten(1).amin(1) > 0.5
            if bool(full.all()):
                mask = None  # nothing to leave out: the plain path, bit for bit
            else:
                self.full, self.all_partial = full, not bool(full.any())
        self.mask = mask

    def at(self, h: int, w: int) -> "torch.Tensor | None":
        m = self.mask
        if m is None:
            return None
        if m.shape[-2:] != (h, w):
            # a cell of a coarser map is tissue where any input pixel under it is
            m = F.adaptive_max_pool2d(m, (h, w))
        return m

    def select(self, plain, masked) -> torch.Tensor:
        """Per sample: the plain result where its mask is full, the masked one elsewhere.
        A sample with a full mask so gets exactly what it gets without a mask, whatever
        the other samples of its batch are."""
        if self.all_partial:
            return masked()
        p = plain()
        full = self.full.reshape(-1, *([1] * (p.ndim - 1)))
        return torch.where(full, p, masked().to(p.dtype))


def masked_mean(x: torch.Tensor, m: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Mean of ``x`` over ``dims`` counting only where ``m`` (broadcast to ``x``) is 1."""
    n = (m * torch.ones_like(x)).sum(dims, keepdim=True)
    return (x * m).sum(dims, keepdim=True) / n.clamp_min(1.0)


class TissueGroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics can be taken over tissue pixels only.

    Without a mask it is ``nn.GroupNorm`` (same parameters, same state-dict keys, same
    result).  With one (``Backbone.forward(x, stat_mask)``), each sample's mean and
    variance per group come from the pixels the mask marks as tissue, and every pixel is
    normalised with them: white glass around a biopsy fragment then no longer shifts the
    statistics of the tissue it surrounds (the network was trained on patches that are
    almost all tissue).
    """

    def __init__(self, num_groups: int, num_channels: int, holder: "_StatMask | None" = None):
        super().__init__(num_groups, num_channels)
        object.__setattr__(self, "_holder", holder)  # a plain attribute, not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        holder = self._holder
        m = None if holder is None else holder.at(*x.shape[-2:])
        if m is None:
            return super().forward(x)
        return holder.select(lambda: super(TissueGroupNorm, self).forward(x), lambda: self._masked(x, m))

    def _masked(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = self.num_groups
        xf = x.float().reshape(n, c, h * w)
        mf = m.float().reshape(n, h * w, 1)
        cnt = mf.sum(1).clamp_min(1.0) * (c // g)  # N x 1: pixels counted per group
        s1 = torch.bmm(xf, mf).reshape(n, g, c // g).sum(-1)  # N x G
        s2 = torch.bmm(xf * xf, mf).reshape(n, g, c // g).sum(-1)
        mean = s1 / cnt
        var = (s2 / cnt - mean * mean).clamp_min(0.0)
        rstd = torch.rsqrt(var + self.eps).repeat_interleave(c // g, dim=1)  # N x C
        a = rstd * self.weight.float()
        b = self.bias.float() - mean.repeat_interleave(c // g, dim=1) * a
        return torch.addcmul(b[:, :, None, None], x.float(), a[:, :, None, None])


class ResBlock(nn.Module):
    """Pre-activation residual block: GN-ReLU-conv3x3 twice plus a shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 16, holder: "_StatMask | None" = None):
        super().__init__()
        self.gn1 = TissueGroupNorm(groups, cin, holder)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.gn2 = TissueGroupNorm(groups, cout, holder)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                TissueGroupNorm(groups, cin, holder), nn.ReLU(inplace=False), nn.Conv2d(cin, cout, 1, stride, bias=False)
            )
        else:
            self.downsample = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.gn1(x)))
        out = self.conv2(F.relu(self.gn2(out)))
        short = x if self.downsample is None else self.downsample(x)
        return out + short


def _stage(cin: int, cout: int, n: int, stride: int, groups: int, holder: "_StatMask | None" = None) -> nn.Sequential:
    layers = [ResBlock(cin, cout, stride, groups, holder)]
    layers += [ResBlock(cout, cout, 1, groups, holder) for _ in range(n - 1)]
    return nn.Sequential(*layers)


class Backbone(nn.Module):
    """Residual U-Net: returns (8-channel decoder features, 256-d GAP vector)."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        w, b, g = cfg.widths, cfg.blocks, cfg.groups
        self._stat = hold = _StatMask()
        self.stem = nn.Conv2d(cfg.in_channels, w[0], 3, 1, 1, bias=False)
        stages = []
        cin = w[0]
        for i, (cout, n) in enumerate(zip(w, b)):
            stages.append(_stage(cin, cout, n, 1 if i == 0 else 2, g, hold))
            cin = cout
        self.encoder = nn.ModuleList(stages)
        self.fusion = nn.Sequential(TissueGroupNorm(g, w[-1], hold), nn.ReLU(), nn.Conv2d(w[-1], w[-1], 1, bias=False))
        self.gap_norm = TissueGroupNorm(g, w[-1], hold)
        # decoder: from the deepest width down to the first, adding the encoder skips
        # level i adds skip i (width w[i]) and maps w[i] -> w[i-1] (w[0] at the top)
        if w[-1] != w[-2]:
            raise ValueError("the last two widths must match (the bottleneck adds skip 3 directly)")
        dec = [ResBlock(w[i], w[max(i - 1, 0)], 1, g, hold) for i in range(len(w) - 2, -1, -1)]
        self.decoder = nn.ModuleList(dec)
        self.precls = nn.Sequential(TissueGroupNorm(g, w[0], hold), nn.ReLU(), nn.Conv2d(w[0], cfg.head_channels, 1))

    def forward(self, x: torch.Tensor, stat_mask: "torch.Tensor | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``stat_mask`` (N x 1 x H x W, 1 = tissue): take every normalisation's statistics
        and the pooled vector over those pixels only (see ``TissueGroupNorm``)."""
        if stat_mask is not None:
            stat_mask = stat_mask.to(device=x.device, dtype=torch.float32)
            if stat_mask.shape != (x.shape[0], 1, *x.shape[-2:]):
                raise ValueError(f"stat_mask must be N x 1 x H x W matching the images, got {tuple(stat_mask.shape)}")
        self._stat.set(stat_mask)
        try:
            skips = []
            x = self.stem(x)
            for st in self.encoder:
                x = st(x)
                skips.append(x)
            x = self.fusion(x)
            v = F.relu(self.gap_norm(x))
            m = self._stat.at(*v.shape[-2:])
            if m is None:
                gap = F.adaptive_avg_pool2d(v, 1)
            else:
                gap = self._stat.select(lambda: F.adaptive_avg_pool2d(v, 1), lambda: masked_mean(v.float(), m, (2, 3)))
            gap = gap.flatten(1)
            for blk, skip in zip(self.decoder, reversed(skips[:-1])):
                x = F.interpolate(x, scale_factor=2.0, mode="nearest")
                x = blk(x + skip)
            return self.precls(x), gap
        finally:
            self._stat.set(None)


class OmniSegNet(nn.Module):
    """Scale-aware Omni-Seg: one backbone, one dynamic head per (tissue, scale)."""

    def __init__(self, cfg: NetConfig | None = None):
        super().__init__()
        self.cfg = cfg or NetConfig()
        c = self.cfg
        if len(c.tissue_scales) != c.n_tissues:
            raise ValueError("tissue_scales must name one scale per tissue")
        self.backbone = Backbone(c)
        feat = c.widths[-1]
        self.head_split = head_split(c.head_channels)
        n_params = sum(self.head_split)
        self.controller_weight = nn.Parameter(torch.empty(c.n_tissues, c.n_scales, n_params, feat))
        self.controller_bias = nn.Parameter(torch.zeros(n_params))
        self.controller_pair_bias = nn.Parameter(torch.empty(c.n_tissues, c.n_scales, n_params))
        if c.statistics not in ("tile", "tissue"):
            raise ValueError(f"unknown statistics {c.statistics!r} (use 'tile' or 'tissue')")
        if c.pool_norm not in ("none", "unit"):
            raise ValueError(f"unknown pool_norm {c.pool_norm!r} (use 'none' or 'unit')")
        if c.controller_init == "uniform":
            # the feature part at the scale of a default linear layer over the 6144-wide
            # outer product; each pair's own head like default 1x1 convs (fan-in 8)
            bound = 1.0 / (feat * c.n_tissues * c.n_scales) ** 0.5
            nn.init.uniform_(self.controller_weight, -bound, bound)
            nn.init.uniform_(self.controller_bias, -bound, bound)
            hb = 1.0 / c.head_channels**0.5
            nn.init.uniform_(self.controller_pair_bias, -hb, hb)
        elif c.controller_init == "head":
            self._init_as_conv_heads()
        else:
            raise ValueError(f"unknown controller_init {c.controller_init!r} (use 'uniform' or 'head')")

    def _init_as_conv_heads(self) -> None:
        """Image part zero; each pair's vector a He-initialised k -> k -> k -> 2 conv stack (k = 8 by default).

        With the reference's init the three-layer head shrinks the signal at every layer
        (its output is nearly constant over the pixels) and the image-dependent part is
        larger than the head itself; here every head starts as an ordinary conv head whose
        output varies with the pixel, and the image learns to modulate it."""
        c = self.cfg
        k = c.head_channels
        with torch.no_grad():
            self.controller_weight.zero_()
            self.controller_bias.zero_()
            pb = torch.zeros_like(self.controller_pair_bias)
            o = 0
            for size, fan_in, gain in ((k * k, k, 2.0), (k * k, k, 2.0), (2 * k, k, 1.0)):
                pb[..., o : o + size].normal_(0.0, (gain / fan_in) ** 0.5)
                o += size
            self.controller_pair_bias.copy_(pb)  # biases (the last 18 numbers) stay zero

    def pooled(self, gap: torch.Tensor) -> torch.Tensor:
        """The pooled vector as the controller sees it (see ``NetConfig.pool_norm``)."""
        if self.cfg.pool_norm == "unit":
            g = gap - gap.mean(dim=1, keepdim=True)
            return g / (g.norm(dim=1, keepdim=True) + 1e-6)
        return gap

    # -- the expensive, tissue-independent part -------------------------------------
    def features(self, images: torch.Tensor, stat_mask: "torch.Tensor | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the backbone once: images N x 3 x H x W in [0, 1] -> (N x 8 x H x W, N x 256).

        ``stat_mask`` (N x 1 x H x W, 1 = tissue), if given: normalisation statistics and
        the pooled vector come from the tissue pixels only."""
        d = self.cfg.divisor
        if images.ndim != 4 or images.shape[-1] % d or images.shape[-2] % d:
            raise ValueError(f"images must be N x C x H x W with H and W multiples of {d}, got {tuple(images.shape)}")
        return self.backbone(images, stat_mask)

    # -- the cheap, tissue-specific part -------------------------------------------
    def head_params(self, gap: torch.Tensor, tissues: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """Controller: gap N x 256, tissues and scales N x T (ints) -> N x T x P (P = 162 for 8 channels)."""
        w = self.controller_weight[tissues, scales]  # N x T x 162 x 256
        return torch.einsum("ntpf,nf->ntp", w, self.pooled(gap)) + self.controller_pair_bias[tissues, scales] + self.controller_bias

    def heads(
        self,
        features: tuple[torch.Tensor, torch.Tensor],
        tissues: "Sequence[int] | torch.Tensor",
        scales: "Sequence[int] | torch.Tensor | None" = None,
    ) -> torch.Tensor:
        """Apply the dynamic head of each tissue to shared features.

        ``tissues`` is either a list of T tissue ids applied to every sample, or an
        N x T integer tensor (one row per sample).  ``scales`` defaults to each
        tissue's own magnification.  Returns logits N x T x 2 x H x W.
        """
        fmap, gap = features
        n = fmap.shape[0]
        t = torch.as_tensor(tissues, dtype=torch.long, device=fmap.device)
        if t.ndim == 1:
            t = t.unsqueeze(0).expand(n, -1)
        if scales is None:
            table = torch.as_tensor(self.cfg.tissue_scales, dtype=torch.long, device=fmap.device)
            s = table[t]
        else:
            s = torch.as_tensor(scales, dtype=torch.long, device=fmap.device)
            if s.ndim == 1:
                s = s.unsqueeze(0).expand(n, -1)
        params = self.head_params(gap.float(), t, s).to(fmap.dtype)
        w1, w2, w3, b1, b2, b3 = torch.split(params, self.head_split, dim=-1)
        k = self.cfg.head_channels
        nt = t.shape[1]
        w1 = w1.reshape(n, nt, k, k)
        w2 = w2.reshape(n, nt, k, k)
        w3 = w3.reshape(n, nt, 2, k)
        h, wd = fmap.shape[-2:]
        x = fmap.reshape(n, 1, k, h * wd)  # N x 1 x 8 x P, broadcast over tissues
        x = F.relu(torch.matmul(w1, x) + b1.unsqueeze(-1))
        x = F.relu(torch.matmul(w2, x) + b2.unsqueeze(-1))
        x = torch.matmul(w3, x) + b3.unsqueeze(-1)
        return x.reshape(n, nt, 2, h, wd)

    def forward(
        self,
        images: torch.Tensor,
        tissues: "torch.Tensor | Sequence[int]",
        scales: "torch.Tensor | Sequence[int] | None" = None,
    ) -> torch.Tensor:
        """Per-sample forward: tissues (and scales) of length N -> logits N x 2 x H x W."""
        t = torch.as_tensor(tissues, dtype=torch.long, device=images.device).reshape(-1, 1)
        s = None if scales is None else torch.as_tensor(scales, dtype=torch.long, device=images.device).reshape(-1, 1)
        return self.heads(self.features(images), t, s)[:, 0]


def foreground(logits: torch.Tensor) -> torch.Tensor:
    """Binary decision of the 2-logit output: foreground where logit[1] > logit[0]."""
    return logits[..., 1, :, :] > logits[..., 0, :, :]


def fg_probability(logits: torch.Tensor) -> torch.Tensor:
    """Probability of foreground from the 2 logits (softmax over the pair)."""
    return torch.sigmoid(logits[..., 1, :, :] - logits[..., 0, :, :])


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
