"""Sample data: real kidney tissue at true scale, and a real Aperio slide.

- *Renal demo region*: the 10x (1.0 um/px) patches of one split of the renal demo
  data (human kidney biopsies, four stains; see the data's README) laid out as a
  mosaic, one row per stain, 1024 x 1024 px = 1 mm^2 for the test split.  Patches
  that occur under two tissues are placed once with both labels.  A second layer
  holds the demo's own labels as ground truth (value = tissue id + 1, tissue colours);
  only the tissue a patch was labelled for is known there.
- *CMU-1-Small-Region.svs*: the OpenSlide project's public test slide (CC0), read
  through the plugin's slide reader at its recorded 0.499 um/px.

The slide (1.9 MB, CC0) ships in ``napari_omniseg/sample/``, so the sample opens
from any installed copy; ``$OMNISEG_SAMPLE_SLIDE`` may point at another copy.  The
renal-demo folder is looked up in ``$OMNISEG_DEMO_DATA`` or the ``shared/data``
folder beside a source checkout.  Without the demo folder, the renal sample falls back to the 10x mosaic
that ``omniseg demo`` bundles in ``napari_omniseg/sample/`` when the installed
package has it (same test-split patches, laid out with gaps).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from .tissues import TISSUES, get_tissue

SAMPLE_MPP = 1.0  #: the 10x patches are 1.0 um/px
PATCH = 256
STAIN_ORDER = ("he", "pas", "sil", "tri")
SVS_NAME = "CMU-1-Small-Region.svs"


class SampleDataMissing(FileNotFoundError):
    pass


def _candidates() -> list[Path]:
    here = Path(__file__).resolve()
    out = []
    for up in here.parents[:5]:
        out.append(up / "shared" / "data")
    return out


def find_demo_dir() -> Path:
    env = os.environ.get("OMNISEG_DEMO_DATA")
    cands = ([Path(env)] if env else []) + [c / "renal-demo" for c in _candidates()]
    for c in cands:
        if (c / "splits.csv").exists():
            return c
    raise SampleDataMissing(
        "renal demo data not found; set OMNISEG_DEMO_DATA to the renal-demo folder "
        f"(looked in: {', '.join(str(c) for c in cands)})"
    )


def find_sample_slide() -> Path:
    env = os.environ.get("OMNISEG_SAMPLE_SLIDE")
    bundled = Path(__file__).resolve().parent / "sample" / SVS_NAME
    cands = ([Path(env)] if env else []) + [bundled] + [c / "slides" / SVS_NAME for c in _candidates()]
    for c in cands:
        if c.is_file():
            return c
    raise SampleDataMissing(
        f"{SVS_NAME} not found: the copy bundled with napari-omniseg is missing, so the installation is "
        f"incomplete; reinstall napari-omniseg (looked in: {', '.join(str(c) for c in cands)})"
    )


def build_renal_mosaic(demo_dir: "str | Path | None" = None, split: str = "test", magnification: int = 10):
    """The mosaic image (uint8 H x W x 3), ground truth (uint8 H x W, tissue id + 1) and
    a list of patch records (stain, file, box (y, x, h, w), tissues labelled)."""
    from .training.data import read_image, read_mask

    demo = Path(demo_dir) if demo_dir else find_demo_dir()
    with open(demo / "splits.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == split and int(r["magnification"]) == magnification]
    if not rows:
        raise SampleDataMissing(f"{demo}/splits.csv has no {magnification}x patches in split {split!r}")
    images: dict[tuple[str, str], dict] = {}
    for r in rows:
        key = (r["stain"], Path(r["image_path"]).name)
        rec = images.setdefault(key, {"image": demo / r["image_path"], "labels": {}})
        rec["labels"][r["tissue"]] = demo / r["label_path"]
    by_stain: dict[str, list] = {}
    for (stain, name), rec in sorted(images.items(), key=lambda kv: (STAIN_ORDER.index(kv[0][0])
                                                                      if kv[0][0] in STAIN_ORDER else 9, kv[0][1])):
        by_stain.setdefault(stain, []).append((name, rec))
    ncols = max(len(v) for v in by_stain.values())
    H, W = PATCH * len(by_stain), PATCH * ncols
    img = np.full((H, W, 3), 255, np.uint8)
    gt = np.zeros((H, W), np.uint8)
    patches = []
    for i, (stain, items) in enumerate(by_stain.items()):
        for j, (name, rec) in enumerate(items):
            a = read_image(rec["image"])
            h, w = min(PATCH, a.shape[0]), min(PATCH, a.shape[1])
            y, x = i * PATCH, j * PATCH
            img[y : y + h, x : x + w] = a[:h, :w]
            for tname, lp in sorted(rec["labels"].items()):
                t = get_tissue(tname)
                m = read_mask(lp)[:h, :w]
                gt[y : y + h, x : x + w][m] = t.id + 1
            patches.append({"stain": stain, "file": name, "box": (y, x, h, w), "tissues": sorted(rec["labels"])})
    return img, gt, patches


def _gt_colormap() -> dict:
    cm = {0: "transparent", None: "transparent"}
    for t in TISSUES:
        cm[t.id + 1] = t.color
    return cm


def bundled_renal_mosaic():
    """The 10x mosaic bundled for ``omniseg demo`` (image, ground truth, patches), if installed."""
    import json

    folder = Path(__file__).resolve().parent / "sample"
    index = folder / "sample.json"
    if not index.exists():
        raise SampleDataMissing(f"no bundled sample in {folder}")
    mos = next((m for m in json.loads(index.read_text()).get("mosaics", []) if int(m.get("magnification", 0)) == 10),
               None)
    if mos is None:
        raise SampleDataMissing(f"{index} has no 10x mosaic")
    import tifffile

    img = np.asarray(tifffile.imread(folder / mos["image"]))[..., :3].astype(np.uint8)
    lab = np.asarray(tifffile.imread(folder / mos["labels"])) > 0
    gt = np.zeros(lab.shape, np.uint8)
    patches = []
    for p in mos["patches"]:
        y, x, h, w = int(p["y"]), int(p["x"]), int(p["h"]), int(p["w"])
        t = get_tissue(p["tissue"])
        gt[y : y + h, x : x + w][lab[y : y + h, x : x + w]] = t.id + 1
        patches.append({"stain": p.get("stain", ""), "file": Path(p.get("file", "")).name, "box": (y, x, h, w),
                        "tissues": [t.name]})
    return img, gt, patches, str(folder / mos["image"])


def renal_sample():
    """napari sample: the renal demo mosaic and its ground-truth labels."""
    slide_id = "renal-demo-test-10x"
    try:
        demo = find_demo_dir()
        img, gt, patches = build_renal_mosaic(demo, "test")
    except SampleDataMissing as missing:
        try:
            img, gt, patches, demo = bundled_renal_mosaic()
        except SampleDataMissing:
            raise missing from None
        slide_id += "-bundled"  # another layout: another project folder
    common = {"scale": (SAMPLE_MPP, SAMPLE_MPP), "units": ("micrometer", "micrometer")}
    meta = {"mpp": SAMPLE_MPP, "source": str(demo), "split": "test", "slide_id": slide_id,
            "patches": patches}
    return [
        (img, {"name": "renal demo (test split, 10x)", "rgb": True, "metadata": meta, **common}, "image"),
        (gt, {"name": "ground truth (demo labels)", "colormap": _gt_colormap(), "opacity": 0.5, "visible": False,
              "metadata": {"mpp": SAMPLE_MPP, "ground_truth": True, "patches": patches}, **common}, "labels"),
    ]


def cmu_slide_sample():
    """napari sample: CMU-1-Small-Region.svs through the plugin's slide reader."""
    from ._reader import read_slide

    return read_slide(str(find_sample_slide()))
