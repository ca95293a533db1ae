"""The shipped model and the bundled sample, end to end (no network, no data beside the package)."""

import json

import pytest

from napari_omniseg.cli import main
from napari_omniseg.model import load_checkpoint, shipped_checkpoint


def test_shipped_model_loads_and_is_small():
    p = shipped_checkpoint()
    assert p is not None, "the package must ship a model"
    assert p.stat().st_size < 20e6
    ck = load_checkpoint(p)
    # warm-started from the earlier shipped models, trained on train+val (68 + 19 patches) and
    # 16 of the 24 AIDPATH tiles, last epoch kept; scored on the 23 test patches; the last
    # steps with zoom augmentation and negatives across magnifications for every head but
    # the 40x capillary; then with defocus (two seeds averaged); the last step averages a
    # 40-epoch fine-tune with colour transfer (its provenance comes first) with the model before
    assert ck.provenance["train_split"] == "train+val" and ck.provenance["n_train"] == 103
    assert ck.provenance["n_extra"] == 16 and ck.provenance["init"] == "shipped"
    assert ck.provenance["n_val"] == 0 and ck.provenance["best_epoch"] == ck.provenance["epochs"] == 40
    assert ck.provenance["train_config"]["aug"]["p_lab_transfer"] == 0.5
    assert len(ck.provenance["train_config"]["aug"]["lab_stats"]) == 12
    assert ck.provenance["train_config"]["aug"]["p_zoom"] == 0.5
    assert ck.provenance["train_config"]["aug"]["p_defocus"] == 0.3 and len(ck.provenance["averaged_from"]) == 2
    assert set(ck.provenance["cross_scale_negatives"]) == {
        "glomerular_unit", "glomerular_tuft", "distal_tubule", "proximal_tubule", "artery"}
    # decision thresholds calibrated on those training patches only (omniseg calibrate):
    # the under-confident heads are cut lower; the test split was not used
    assert ck.provenance["calibration"]["n"] == 103
    assert ck.threshold("distal_tubule") < 0.5 and ck.threshold("artery") < 0.5
    assert ck.threshold("glomerular_unit") == 0.5
    assert ck.metrics["test_mean_dice"] == pytest.approx(0.511, abs=0.001)
    # the model it replaced (step 6) is recorded as its parent, and was averaged in
    assert ck.provenance["replaces_sha256"] in {a["sha256"] for a in ck.provenance["averaged_from"]}


def test_demo_segments_the_bundled_sample(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n_patches"] == 23 and len(res["per_tissue"]) == 6
    # measured with the shipped model: mean 0.350 (PT 0.618, unit 0.547, tuft 0.397, DT
    # 0.411; the mosaic's tiles mix neighbouring patches, see docs/training-results.md);
    # the tissues it has learned must stay found
    assert res["per_tissue"]["proximal_tubule"]["dice"] > 0.5
    assert res["per_tissue"]["distal_tubule"]["dice"] > 0.15  # found only with its calibrated threshold
    assert res["per_tissue"]["glomerular_unit"]["dice"] > 0.4
    assert res["per_tissue"]["glomerular_tuft"]["dice"] > 0.2
    assert 0.2 < res["mean_dice"] < 1.0
    for name in ("renal_5x", "renal_10x", "renal_40x"):
        assert (tmp_path / f"{name}.ome.zarr" / "zarr.json").exists()
        assert (tmp_path / f"{name}_overlay.png").stat().st_size > 1000
        assert "objects" in (tmp_path / f"{name}_measurements.csv").read_text()
