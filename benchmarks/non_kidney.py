"""How much does the model fire on tissue that is not kidney?

Segments the bundled CMU-1-Small-Region.svs (the OpenSlide project's public Aperio
test slide, H&E, not kidney) with every tissue head through the whole-slide engine,
and prints, per tissue, the share of the slide's tissue area (the engine's own
tissue mask) that the model marks.  Every pixel it marks is a false positive.
Writes an overlay PNG (tissue colours) with ``--png``.

    python benchmarks/non_kidney.py [--checkpoint C] [--png docs/images/cmu-non-kidney.png] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from napari_omniseg._sample_data import find_sample_slide
from napari_omniseg.demo import overlay_png, upsample_to
from napari_omniseg.inference.engine import EngineConfig, Segmenter, segment_region
from napari_omniseg.model import load_checkpoint, resolve_checkpoint
from napari_omniseg.slides import open_slide
from napari_omniseg.slides.tissue_mask import tissue_mask


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint")
    p.add_argument("--png")
    p.add_argument("--json")
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args(argv)
    ck = load_checkpoint(resolve_checkpoint(a.checkpoint))
    seg = Segmenter(ck, EngineConfig(device="cpu", skip_background=True, threads=a.threads))
    with open_slide(find_sample_slide()) as src:
        labels, rep = segment_region(seg, src)
        H, W = src.shapes[0]
        image = np.asarray(src.read_region(0, 0, 0, H, W))[..., :3]
        mask, mask_mpp = tissue_mask(src)
        f = mask_mpp / src.mpp
        tissue = upsample_to(mask, (H, W), f)
    res = {"slide": "CMU-1-Small-Region.svs", "model": ck.version, "tissue_px": int(tissue.sum()),
           "seconds": round(rep.seconds, 1), "marked_share_of_tissue": {}}
    on_grid = {}
    for name, lab in labels.items():
        g = upsample_to(lab.data, (H, W), lab.factor)
        on_grid[name] = g
        res["marked_share_of_tissue"][name] = float(((g == 1) & tissue).sum() / max(1, tissue.sum()))
    print(f"model {ck.version} on CMU-1-Small-Region.svs (H&E, not kidney), {rep.seconds:.0f} s")
    print("| tissue head | share of the slide's tissue marked |")
    print("|---|---:|")
    for n, v in res["marked_share_of_tissue"].items():
        print(f"| {n} | {100 * v:.1f} % |")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    if a.png:  # a quarter of the side keeps the PNG small enough for the docs
        overlay_png(image[::4, ::4], {k: v[::4, ::4] for k, v in on_grid.items()}, ck.tissues, Path(a.png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
