"""Build the bundled sample from the renal demo's test split (run once; output is committed).

For each magnification present (5x, 10x, 40x) the test patches labelled for tissues
at that magnification are laid out in a grid with white gaps, at their true pixel
size, and written as an OME-TIFF with that pixel size; the patches' own masks go in
a second TIFF (value 1 where the patch's labelled tissue is), and ``sample.json``
records each patch's box, tissue, stain and source file.  Unlabelled tissues in a
patch are unknown, so Dice is computed per patch for its labelled tissue only.

    python scripts/build_sample.py ../shared/data/renal-demo src/napari_omniseg/sample
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import tifffile

from napari_omniseg.tissues import MAGNIFICATIONS
from napari_omniseg.training.data import load_arrays, load_dataset, select

GAP = 32


def build(data: Path, out: Path, split: str = "test") -> dict:
    samples = load_arrays(select(load_dataset(data), split))
    out.mkdir(parents=True, exist_ok=True)
    index = {"split": split, "source": "renal-demo (Jayapandian et al. 2021 via the Omni-Seg demo set)", "mosaics": []}
    for mag in sorted({s.tissue.magnification for s in samples}):
        group = sorted((s for s in samples if s.tissue.magnification == mag), key=lambda s: (s.tissue.id, s.stain, s.image_path.name))
        n = len(group)
        cols = math.ceil(math.sqrt(n))
        rows = math.ceil(n / cols)
        ph, pw = group[0].image.shape[:2]
        H, W = GAP + rows * (ph + GAP), GAP + cols * (pw + GAP)
        img = np.full((H, W, 3), 255, np.uint8)
        lab = np.zeros((H, W), np.uint8)
        patches = []
        for k, s in enumerate(group):
            r, c = divmod(k, cols)
            y, x = GAP + r * (ph + GAP), GAP + c * (pw + GAP)
            img[y : y + ph, x : x + pw] = s.image
            lab[y : y + ph, x : x + pw] = s.mask
            patches.append({"x": x, "y": y, "w": pw, "h": ph, "tissue": s.tissue.name, "stain": s.stain,
                            "file": str(s.image_path.relative_to(data))})
        mpp = MAGNIFICATIONS[mag]
        name = f"renal_{mag}x"
        meta = {"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp,
                "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"}
        tifffile.imwrite(out / f"{name}.ome.tif", img, photometric="rgb", tile=(256, 256), compression="zlib",
                         metadata=meta, ome=True)
        tifffile.imwrite(out / f"{name}_labels.tif", lab, tile=(256, 256), compression="zlib")
        index["mosaics"].append({"name": name, "image": f"{name}.ome.tif", "labels": f"{name}_labels.tif",
                                 "magnification": mag, "mpp": mpp, "shape": [H, W], "patches": patches})
    (out / "sample.json").write_text(json.dumps(index, indent=2))
    return index


if __name__ == "__main__":
    idx = build(Path(sys.argv[1]), Path(sys.argv[2]))
    for m in idx["mosaics"]:
        print(m["name"], m["shape"], len(m["patches"]), "patches")
