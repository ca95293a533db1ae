"""``omniseg demo``: the bundled kidney sample, end to end, with the shipped model.

The sample (``napari_omniseg/sample/``) holds the renal demo's *test* split laid out
as one mosaic per magnification (5x, 10x, 40x) at true pixel size.  The demo runs
the whole-slide pipeline on each mosaic (tiling, shared backbone, blending,
OME-Zarr output), writes a measurements CSV and an overlay PNG per mosaic, and
scores every patch against its own label (each patch is labelled for one tissue;
the others are unknown there, so they are not scored).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from .cli import _args, command

SAMPLE_DIR = Path(__file__).resolve().parent / "sample"


def sample_index() -> dict:
    p = SAMPLE_DIR / "sample.json"
    if not p.exists():
        raise FileNotFoundError(f"the bundled sample is missing ({p}); reinstall napari-omniseg")
    return json.loads(p.read_text())


def load_sample_labels(mosaic: dict) -> np.ndarray:
    import tifffile

    return tifffile.imread(SAMPLE_DIR / mosaic["labels"]).astype(bool)


def bundled_samples() -> list:
    """The bundled sample's 23 real test patches as training :class:`Sample` objects.

    Each is cut from its mosaic with its own label, at its tissue's magnification, so
    a clone of the repository (or an installed wheel) has real labelled kidney patches
    without any data folder beside it (tests use them for that)."""
    from .slides import open_slide
    from .tissues import get_tissue
    from .training.data import Sample

    out = []
    for m in sample_index()["mosaics"]:
        truth = load_sample_labels(m)
        with open_slide(SAMPLE_DIR / m["image"]) as src:
            image = np.asarray(src.read_region(0, 0, 0, *src.shapes[0]))[..., :3]
        for p in m["patches"]:
            sl = (slice(p["y"], p["y"] + p["h"]), slice(p["x"], p["x"] + p["w"]))
            out.append(Sample(SAMPLE_DIR / m["image"], SAMPLE_DIR / m["labels"], get_tissue(p["tissue"]),
                              stain=p["stain"], split=str(sample_index()["split"]), origin="bundled sample",
                              meta={"file": p["file"], "x": p["x"], "y": p["y"]},
                              image=np.ascontiguousarray(image[sl]), mask=np.ascontiguousarray(truth[sl])))
    return out


def overlay_png(image: np.ndarray, labels: dict[str, np.ndarray], tissues, path: Path, alpha: float = 0.45) -> None:
    """Blend each tissue's mask (already on the image grid) in its colour and write a PNG."""
    import imageio.v3 as iio
    from scipy import ndimage as ndi

    out = image.astype(np.float32).copy()
    for t in tissues:
        m = labels.get(t.name)
        if m is None:
            continue
        fg = m == 1
        out[fg] = (1 - alpha) * out[fg] + alpha * np.array(t.rgb, np.float32)
        edge = fg & ~ndi.binary_erosion(fg)
        out[edge] = t.rgb
    iio.imwrite(path, np.clip(out, 0, 255).astype(np.uint8))


def upsample_to(lab: np.ndarray, shape: tuple[int, int], factor: float) -> np.ndarray:
    """Nearest-neighbour: a tissue grid (factor level-0 px per pixel) onto level 0."""
    ys = np.minimum((np.arange(shape[0]) / factor).astype(int), lab.shape[0] - 1)
    xs = np.minimum((np.arange(shape[1]) / factor).astype(int), lab.shape[1] - 1)
    return lab[np.ix_(ys, xs)]


def run_demo(out: Path, checkpoint=None, device="auto", on_progress=None, core: int = 256) -> dict:
    from .labels.export import write_measurements_csv
    from .model import load_checkpoint, resolve_checkpoint
    from .inference.engine import EngineConfig, Segmenter
    from .inference.run import segment_to_store
    from .slides import open_slide
    from .tissues import get_tissue
    from .training.metrics import segmentation_scores, summarize

    idx = sample_index()
    ck = load_checkpoint(resolve_checkpoint(checkpoint))
    # the mosaics are all tissue (with thin white gaps): run every tile
    seg = Segmenter(ck, EngineConfig(device=device, core=core, margin=32, batch_size=4, skip_background=False))
    out.mkdir(parents=True, exist_ok=True)
    rows, runs = [], []
    t0 = time.perf_counter()
    for m in idx["mosaics"]:
        tissues = sorted({p["tissue"] for p in m["patches"]}, key=lambda n: get_tissue(n).id)
        store_path = out / f"{m['name']}.ome.zarr"
        with open_slide(SAMPLE_DIR / m["image"]) as src:
            store, rep = segment_to_store(seg, src, store_path, tissues, on_progress=on_progress)
            image = src.read_region(0, 0, 0, *src.shapes[0])
        truth = load_sample_labels(m)
        on_grid = {}
        for name in tissues:
            lab = store.read(name)
            f = store.mpp(name) / m["mpp"]
            on_grid[name] = upsample_to(lab, truth.shape, f) if f != 1 else lab[: truth.shape[0], : truth.shape[1]]
        for p in m["patches"]:
            t = get_tissue(p["tissue"])
            sl = (slice(p["y"], p["y"] + p["h"]), slice(p["x"], p["x"] + p["w"]))
            pred = on_grid[t.name][sl] == 1
            sc = segmentation_scores(pred, truth[sl], t.mpp)
            rows.append({"tissue": t.name, "stain": p["stain"], "image": p["file"], **sc})
        write_measurements_csv(store, out / f"{m['name']}_measurements.csv")
        overlay_png(image, on_grid, [get_tissue(n) for n in tissues], out / f"{m['name']}_overlay.png")
        runs.append({"mosaic": m["name"], "tiles_run": rep.tiles_run, "seconds": round(rep.seconds, 1)})
    summ = summarize(rows)
    result = {"checkpoint": str(ck.path), "version": ck.version, "split": idx["split"], "n_patches": len(rows),
              "wall_time_s": round(time.perf_counter() - t0, 1), "runs": runs, **summ}
    (out / "demo_scores.json").write_text(json.dumps(result, indent=2, default=float))
    return result


def _demo_args(p: argparse.ArgumentParser):
    p.add_argument("--out", "-o", default="omniseg-demo", help="output folder (default ./omniseg-demo)")
    p.add_argument("--checkpoint", "-c", help="checkpoint (default: the active, else the shipped model)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")


@command("demo")
@_args(_demo_args)
def cmd_demo(a: argparse.Namespace) -> int:
    """Segment the bundled kidney sample (renal demo test split, real patches at true scale) and score it."""
    from .training.metrics import format_table
    from .tissues import TISSUES

    out = Path(a.out)
    res = run_demo(out, a.checkpoint, a.device)
    if a.json:
        print(json.dumps(res, indent=2, default=float))
        return 0
    print(f"model {res['version']}; {res['n_patches']} held-out test patches segmented through the whole-slide "
          f"pipeline in {res['wall_time_s']:.0f} s")
    print(format_table(res, [t.name for t in TISSUES]))
    print(f"\nwrote {out}/: *.ome.zarr (labels), *_measurements.csv, *_overlay.png, demo_scores.json")
    return 0
