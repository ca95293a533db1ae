"""Does a head give the same answer on a 256 px patch and inside a whole-slide tile?

The dynamic head depends on the image through the pooled feature vector, and the
pool covers the whole input: a 256 px training patch, a 320 px tile (core 256 +
2 x 32 margin, what ``omniseg demo`` uses) or the engine's default 576 px tile
(core 512).  This scores the bundled test mosaics (23 real patches) three ways with
one checkpoint and prints per-tissue Dice side by side:

    python benchmarks/tile_size.py [--checkpoint C] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from napari_omniseg.demo import bundled_samples, run_demo
from napari_omniseg.model import load_checkpoint, resolve_checkpoint
from napari_omniseg.tissues import TISSUES
from napari_omniseg.training.loop import evaluate_samples


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint")
    p.add_argument("--json")
    a = p.parse_args(argv)
    ck = load_checkpoint(resolve_checkpoint(a.checkpoint))
    cols = {}
    _, summ = evaluate_samples(ck, bundled_samples())
    cols["patch 256"] = summ
    for core in (256, 512):
        with tempfile.TemporaryDirectory() as d:
            cols[f"tile {core + 64}"] = run_demo(Path(d), a.checkpoint, "cpu", core=core)
    names = [t.name for t in TISSUES]
    print(f"model {ck.version}: foreground Dice on the 23 bundled test patches")
    print("| tissue | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for n in names:
        print(f"| {n} | " + " | ".join(f"{c['per_tissue'][n]['dice']:.3f}" for c in cols.values()) + " |")
    print("| mean | " + " | ".join(f"{c['mean_dice']:.3f}" for c in cols.values()) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps({k: {"mean_dice": v["mean_dice"],
                                                "per_tissue": {n: v["per_tissue"][n]["dice"] for n in names}}
                                            for k, v in cols.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
