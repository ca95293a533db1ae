"""What a corrupt slide tile costs: unknown area and changed pixels against a clean run.

Copies the bundled CMU-1-Small-Region.svs, zeroes the JPEG header of two of its
240 px file tiles, segments the same region of both copies with the shipped model
and prints, per tissue: the damaged area (the two file tiles, in the tissue's own
pixel grid), the area marked unknown (label 255) and their ratio, and how many
pixels outside the unknown area differ from the clean run (and how far the farthest
lies from the damage, in microns).

    python benchmarks/corrupt_tiles.py [--checkpoint C] [--tissues proximal_tubule,glomerular_unit] [--threads 1]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import tifffile

from napari_omniseg.inference.engine import UNKNOWN, EngineConfig, Segmenter, segment_region
from napari_omniseg.model import load_checkpoint, resolve_checkpoint
from napari_omniseg.slides import open_slide

SVS = Path(__file__).resolve().parents[1] / "src/napari_omniseg/sample/CMU-1-Small-Region.svs"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint")
    p.add_argument("--tissues", default="proximal_tubule,glomerular_unit")
    p.add_argument("--tiles", default="17,30", help="indices of the file tiles to corrupt (level 0)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    ck = load_checkpoint(resolve_checkpoint(a.checkpoint))
    seg = Segmenter(ck, EngineConfig(device="cpu", skip_background=False, threads=a.threads))
    tissues = [t.strip() for t in a.tissues.split(",")]
    with tempfile.TemporaryDirectory() as d:
        bad = Path(d) / "corrupt.svs"
        shutil.copy(SVS, bad)
        with tifffile.TiffFile(SVS) as t:
            page = t.pages[0]
            tw, th = page.tilewidth, page.tilelength
            per_row = -(-page.imagewidth // tw)
            offs = [(page.dataoffsets[i], page.databytecounts[i]) for i in map(int, a.tiles.split(","))]
            boxes = [((i // per_row) * th, (i % per_row) * tw) for i in map(int, a.tiles.split(","))]
        data = bytearray(bad.read_bytes())
        for off, _n in offs:
            data[off : off + 64] = bytes(64)
        bad.write_bytes(bytes(data))
        with open_slide(SVS) as s:
            H, W = s.shapes[0]
            ys = [b[0] for b in boxes]
            xs = [b[1] for b in boxes]
            y0, x0 = max(0, min(ys) - 700), max(0, min(xs) - 700)
            region = (x0, y0, min(W, max(xs) + tw + 700) - x0, min(H, max(ys) + th + 700) - y0)
            t0 = time.perf_counter()
            clean, _ = segment_region(seg, s, region, tissues)
            t_clean = time.perf_counter() - t0
            mpp0 = s.mpp
        with open_slide(bad) as s, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            broken, rep = segment_region(seg, s, region, tissues)
            t_bad = time.perf_counter() - t0
    print(f"model {ck.version}; region x={region[0]} y={region[1]} {region[2]}x{region[3]} level-0 px of "
          f"{SVS.name} ({mpp0} um/px); file tiles {a.tiles} ({tw}x{th} px) corrupted")
    print(f"engine tiles with a read error: {len(rep.tiles_failed)}; time clean {t_clean:.1f} s, corrupt {t_bad:.1f} s")
    print("| tissue | damaged px | unknown px | unknown / damaged | differing px outside unknown | farthest (um) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in tissues:
        c, b = clean[name], broken[name]
        dmg = np.zeros(c.data.shape, bool)
        for (ty, tx) in boxes:
            # the file tile in this tissue's grid (data[0,0] is level-0 region origin)
            fy0, fx0 = (ty - region[1]) / c.factor, (tx - region[0]) / c.factor
            dmg[max(0, int(fy0)) : int(np.ceil(fy0 + th / c.factor)), max(0, int(fx0)) : int(np.ceil(fx0 + tw / c.factor))] = True
        unk = b.data == UNKNOWN
        diff = (c.data != b.data) & ~unk
        far = 0.0
        if diff.any():
            from scipy import ndimage as ndi

            dist = ndi.distance_transform_edt(~dmg)
            far = float(dist[diff].max()) * c.mpp
        print(f"| {name} | {dmg.sum()} | {unk.sum()} | {unk.sum() / max(1, dmg.sum()):.2f} | {diff.sum()} | {far:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
