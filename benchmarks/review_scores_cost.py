"""What the review scores cost: their share of a whole-slide segmentation's time.

Segments the bundled renal sample (real kidney patches, 5x/10x tissues) into a label
store with the shipped model and times, in the same run, every call of
``labels.review.block_scores`` (entropy, uncertain share, anatomy violations per
block) against the run's total wall time.  Prints the share in percent.

    python benchmarks/review_scores_cost.py --threads 1
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tissues", nargs="+", default=["distal_tubule", "proximal_tubule", "glomerular_unit", "glomerular_tuft", "artery", "peritubular_capillary"])
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from napari_omniseg.demo import SAMPLE_DIR
    from napari_omniseg.inference.engine import EngineConfig, Segmenter
    from napari_omniseg.inference.run import segment_to_store
    from napari_omniseg.labels import review
    from napari_omniseg.model import load_checkpoint
    from napari_omniseg.model.registry import shipped_checkpoint
    from napari_omniseg.slides import open_slide

    spent = [0.0, 0]
    real = review.block_scores

    def timed(*args, **kw):
        t0 = time.perf_counter()
        try:
            return real(*args, **kw)
        finally:
            spent[0] += time.perf_counter() - t0
            spent[1] += 1

    review.block_scores = timed
    slide = SAMPLE_DIR / "renal_40x.ome.tif"  # the 40x mosaic: every tissue's magnification can be read
    seg = Segmenter(load_checkpoint(shipped_checkpoint()),
                    EngineConfig(device="cpu", core=256, margin=32, batch_size=4, skip_background=False))
    with tempfile.TemporaryDirectory() as d, open_slide(slide) as src:
        t0 = time.perf_counter()
        store, rep = segment_to_store(seg, src, Path(d) / "s.ome.zarr", a.tissues)
        total = time.perf_counter() - t0
    print(f"{slide.name}: {rep.tiles_run} tiles, {rep.blocks_written} blocks, total {total:.2f} s; "
          f"review scores {spent[0]:.3f} s in {spent[1]} calls = {100 * spent[0] / total:.2f} % of the run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
