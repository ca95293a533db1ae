"""Writes docs/images/colour-transfer.png: one demo patch per stain (left column) and
four draws of the colour transfer augmentation (``--lab-transfer``), whose targets come
from the train + validation patches' own colour statistics.

    python docs/images/make_colour_transfer.py [--demo ../shared/data/renal-demo]
"""

import argparse
from pathlib import Path

import imageio.v3 as iio
import numpy as np

from napari_omniseg.training.augment import _lab_transfer, lab_statistics
from napari_omniseg.training.data import load_arrays, load_dataset, select

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--demo", default=str(HERE.parents[2] / "shared" / "data" / "renal-demo"))
    a = p.parse_args()
    train = load_arrays(select(load_dataset(a.demo), ["train", "val"]))
    stats = lab_statistics([s.image for s in train])
    rows = []
    for k, stain in enumerate(["he", "pas", "sil", "tri"]):
        s = next(x for x in train if x.stain == stain and x.tissue.name == "glomerular_unit")
        img = s.image.astype(np.float32) / 255.0
        draws = [_lab_transfer(img, np.random.default_rng(100 * k + d), stats) for d in range(4)]
        row = np.concatenate([img] + [np.pad(x, ((0, 0), (6, 0), (0, 0)), constant_values=1) for x in draws], axis=1)
        rows.append(np.pad(row, ((0, 6), (0, 0), (0, 0)), constant_values=1))
    big = np.concatenate(rows, axis=0)
    h, w = big.shape[0] // 2 * 2, big.shape[1] // 2 * 2
    half = big[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))  # half size: a small file
    out = (np.clip(half, 0, 1) * 255 + 0.5).astype(np.uint8)
    iio.imwrite(HERE / "colour-transfer.png", out)
    print(f"wrote {HERE / 'colour-transfer.png'} {out.shape}")


if __name__ == "__main__":
    main()
