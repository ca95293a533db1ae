"""Which of the network's statistics does glass spoil, and which do the AIDPATH tiles need?

With statistics over tissue only (``NetConfig.statistics = "tissue"`` or
``EngineConfig(tissue_statistics=True)``) every GroupNorm and the pooled head vector
leave glass out.  This runs ``glass_context.py``'s measurement (test patches and the
held-out AIDPATH tiles alone and on a glass canvas K times their side, through the
whole-slide engine) with the tissue mask applied to only part of the network, so each
part's share of the glass loss, and of the AIDPATH tiles' loss, can be read off:

- ``all``: every GroupNorm and the pooled vector (what the package does);
- ``pool``: the pooled head vector only (every GroupNorm over the whole tile);
- ``norm``: every GroupNorm only (the pooled vector over the whole tile);
- ``fine:R``: only GroupNorms on feature maps finer than 1/R of the input (R = 2: the
  full-resolution layers; R = 4: full and half resolution);
- ``coarse:R``: only GroupNorms on maps of 1/R of the input or coarser;
- ``glass:G``: every statistic over tissue, but only in tiles whose pixels inside the
  image are at least a share G glass (the rest use the whole tile).

The restriction is applied in this process only (the package has no such setting;
this is a diagnostic).  The model's own weights are used as they are.

    python benchmarks/statistics_layers.py [--checkpoint C] [--modes all pool norm fine:4]
        [--sizes 1 2] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import glass_context  # noqa: E402

from napari_omniseg.inference import engine as _engine  # noqa: E402
from napari_omniseg.model import network as _net  # noqa: E402


@contextlib.contextmanager
def restricted(mode: str):
    """Within the block, the tissue mask reaches only the part of the network ``mode`` names."""
    gn_forward, pool_mean, stat_mask = (_net.TissueGroupNorm.forward, _net.masked_mean,
                                        _engine.Segmenter._stat_mask)
    plain_gn = lambda self, x: F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)  # noqa: E731
    kind, _, arg = mode.partition(":")
    try:
        if kind == "all":
            pass
        elif kind == "pool":
            _net.TissueGroupNorm.forward = plain_gn
        elif kind == "norm":
            _net.masked_mean = lambda x, m, dims: x.mean(dims, keepdim=True)
        elif kind in ("fine", "coarse"):
            r = int(arg)

            def forward(self, x, _r=r, _fine=kind == "fine"):
                h = self._holder
                if h is None or h.mask is None:
                    return gn_forward(self, x)
                ratio = h.mask.shape[-1] // x.shape[-1]
                return gn_forward(self, x) if (ratio < _r) == _fine else plain_gn(self, x)

            _net.TissueGroupNorm.forward = forward
        elif kind == "glass":
            g = float(arg)

            def gated(self, mask, plan, t, level0_mpp, _g=g):
                sm = stat_mask(self, mask, plan, t, level0_mpp)
                if sm is None:
                    return None
                oy, ox = plan.tile_origin(*t)
                s, (H, W) = plan.tile_size, plan.shape
                ys, xs = np.arange(oy, oy + s), np.arange(ox, ox + s)
                inside = ((ys >= 0) & (ys < H))[:, None] & ((xs >= 0) & (xs < W))[None, :]
                return sm if 1.0 - float(sm[inside].mean()) >= _g else None

            _engine.Segmenter._stat_mask = gated
        else:
            raise ValueError(f"unknown mode {mode!r}")
        yield
    finally:
        _net.TissueGroupNorm.forward, _net.masked_mean = gn_forward, pool_mean
        _engine.Segmenter._stat_mask = stat_mask


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint")
    p.add_argument("--modes", nargs="+", default=["all", "pool", "norm", "fine:2", "fine:4", "coarse:4", "coarse:16"])
    p.add_argument("--sizes", type=float, nargs="+", default=[1, 2])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    a = p.parse_args(argv)
    for m in a.modes:  # reject a bad mode before any work
        with restricted(m):
            pass
    base = ["--sizes", *[f"{k:g}" for k in a.sizes], "--threads", str(a.threads)]
    if a.checkpoint:
        base += ["--checkpoint", a.checkpoint]
    out = {}
    t0 = time.perf_counter()
    for m in a.modes:
        buf = io.StringIO()
        with restricted(m), contextlib.redirect_stdout(buf):
            glass_context.main(base)
        rows = re.findall(r"glass canvas ([0-9.]+)x: test mean ([0-9.]+|None).*AIDPATH held out ([0-9.]+|None)",
                          buf.getvalue())
        out[m] = {k: {"test_mean": None if t == "None" else float(t), "aidpath_mean": None if d == "None" else float(d)}
                  for k, t, d in rows}
        cells = "   ".join(f"{k}x: test {t}  AIDPATH {d}" for k, t, d in rows)
        print(f"{m:10s} {cells}", flush=True)
    print(f"({time.perf_counter() - t0:.0f} s)")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
