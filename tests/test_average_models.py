"""scripts/average_models.py: a weight average of checkpoints, run as a user runs it."""

import subprocess
import sys
from pathlib import Path

import torch

from napari_omniseg.model import load_checkpoint, new_checkpoint, save_checkpoint

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "average_models.py"


def _write(tmp_path, seed, name, thresholds=None):
    ck = new_checkpoint(seed=seed)
    return save_checkpoint(ck.model, tmp_path / name, ck.tissues, normalization=ck.normalization,
                           provenance={"seed": seed}, thresholds=thresholds or {})


def test_average_is_the_weighted_mean_and_keeps_the_first_thresholds(tmp_path):
    a = _write(tmp_path, 1, "a.safetensors", {"distal_tubule": 0.2})
    b = _write(tmp_path, 2, "b.safetensors")
    out = tmp_path / "avg.safetensors"
    r = subprocess.run([sys.executable, str(SCRIPT), str(out), str(a), str(b), "--weights", "0.25,0.75"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    ca, cb, co = load_checkpoint(a), load_checkpoint(b), load_checkpoint(out)
    sa, sb, so = ca.model.state_dict(), cb.model.state_dict(), co.model.state_dict()
    differ = 0
    for k in so:
        if so[k].is_floating_point():
            assert torch.allclose(so[k], 0.25 * sa[k] + 0.75 * sb[k], atol=1e-6), k
            differ += int(not torch.equal(sa[k], sb[k]))
    assert differ > 0  # the two inputs really were different models
    assert co.threshold("distal_tubule") == 0.2
    assert [x["sha256"] for x in co.provenance["averaged_from"]] == [ca.sha256, cb.sha256]


def test_average_refuses_bad_weights_and_never_overwrites(tmp_path):
    a = _write(tmp_path, 1, "a.safetensors")
    b = _write(tmp_path, 2, "b.safetensors")
    r = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "x.safetensors"), str(a), str(b),
                        "--weights", "0.5,0.6"], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "summing to 1" in r.stderr
    r = subprocess.run([sys.executable, str(SCRIPT), str(b), str(a), str(a)], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "already exists" in r.stderr
