"""Store a trained checkpoint in the package as the shipped model (float16).

    python scripts/package_model.py runs/demo-train.safetensors

Keeps the architecture, tissues, normalisation, thresholds, provenance and metrics of the
source checkpoint, adds where it came from (its SHA-256) and the test-split scores
if an ``.eval.json`` from ``benchmarks/train_demo.py`` lies beside it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from napari_omniseg.model import load_checkpoint, save_checkpoint
from napari_omniseg.model.registry import PACKAGE_WEIGHTS, SHIPPED_NAME


def main(src: str) -> None:
    ck = load_checkpoint(src)
    out = PACKAGE_WEIGHTS / SHIPPED_NAME
    replaced = {}
    if out.with_suffix(".json").exists():  # lineage: what the new model replaces (and, if warm-started, grew from)
        old = json.loads(out.with_suffix(".json").read_text())
        replaced = {"replaces_sha256": old.get("weights_sha256"),
                    "replaces_command": (old.get("provenance") or {}).get("command"),
                    "replaces_test_mean_dice": (old.get("metrics") or {}).get("test_mean_dice")}
    for p in (out, out.with_suffix(".json")):
        if p.exists():
            p.unlink()  # the package's copy is replaced on purpose; registry checkpoints never are
    metrics = dict(ck.metrics)
    ev = Path(src).with_suffix(".eval.json")
    if ev.exists():
        s = json.loads(ev.read_text())["summary"]
        metrics["test_mean_dice"] = s["mean_dice"]
        metrics["test"] = {t: {k: v[k] for k in ("n", "dice", "hd_um", "hd95_um", "msd_um")} for t, v in s["per_tissue"].items()}
    prov = dict(ck.provenance, packaged_from_sha256=ck.sha256, packaged_dtype="float16", **replaced)
    save_checkpoint(ck.model, out, ck.tissues, normalization=ck.normalization, provenance=prov, metrics=metrics,
                    dtype=torch.float16, thresholds=ck.thresholds)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main(sys.argv[1])
