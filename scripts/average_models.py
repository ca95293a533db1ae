"""Average the weights of checkpoints that share an architecture (a "model soup").

Meant for fine-tunes warm-started from the same parent, which lie close enough in
weight space for their average to be a working model.  The thresholds are the first
checkpoint's, and so is the way the statistics are taken (``NetConfig.statistics``);
recalibrate the result with ``omniseg calibrate``.

    python scripts/average_models.py OUT.safetensors A.safetensors B.safetensors [--weights 0.5,0.5]
"""

from __future__ import annotations

import argparse

import torch

from napari_omniseg.model import CheckpointError, load_checkpoint, save_checkpoint


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--weights", help="comma-separated, one per input (default: equal)")
    a = p.parse_args(argv)
    cks = [load_checkpoint(x) for x in a.inputs]
    w = [float(x) for x in a.weights.split(",")] if a.weights else [1.0 / len(cks)] * len(cks)
    if len(w) != len(cks) or abs(sum(w) - 1.0) > 1e-6:
        p.error("--weights needs one number per input, summing to 1")
    from dataclasses import replace

    # how the statistics are taken is a way of using the weights, not their shape: the
    # average is used as the first checkpoint is
    if any(replace(c.model.cfg, statistics=cks[0].model.cfg.statistics) != cks[0].model.cfg for c in cks[1:]):
        p.error("the checkpoints differ in architecture")
    if any([t.name for t in c.tissues] != [t.name for t in cks[0].tissues] for c in cks[1:]):
        p.error("the checkpoints differ in tissues")
    states = [{k: v.float() for k, v in c.model.state_dict().items()} for c in cks]
    avg = {k: sum(wi * s[k] for wi, s in zip(w, states)) for k in states[0]}
    model = cks[0].model
    model.load_state_dict(avg)
    prov = dict(cks[0].provenance, averaged_from=[{"sha256": c.sha256, "version": c.version, "weight": wi}
                                                   for c, wi in zip(cks, w)])
    try:
        save_checkpoint(model, a.out, cks[0].tissues, normalization=cks[0].normalization, provenance=prov,
                        thresholds=dict(cks[0].thresholds))
    except (FileExistsError, CheckpointError) as e:
        p.error(str(e))
    print(f"wrote {a.out}: average of {len(cks)} checkpoints, weights {w}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
