"""Per-tissue decision thresholds: chosen on labelled patches, stored in the
checkpoint, used wherever probabilities become labels."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from napari_omniseg.inference.engine import EngineConfig, Segmenter, segment_region
from napari_omniseg.model import CheckpointError, load_checkpoint, new_checkpoint, save_checkpoint, shipped_checkpoint
from napari_omniseg.slides import ImageSlide
from napari_omniseg.tissues import get_tissue
from napari_omniseg.training.calibrate import (
    calibration_counts,
    negative_table,
    penalised_table,
    pick_thresholds,
    threshold_table,
)
from napari_omniseg.training.data import Sample, load_arrays, load_dataset, select
from napari_omniseg.training.loop import evaluate_samples, predict_samples


def _sample(tissue, mask):
    return Sample(image_path=None, label_path=None, tissue=get_tissue(tissue), image=np.zeros((*mask.shape, 3), np.uint8),
                  mask=mask.astype(bool))


def test_threshold_table_and_pick_on_hand_made_probabilities():
    yy, xx = np.mgrid[:64, :64]
    disk = (yy - 32) ** 2 + (xx - 32) ** 2 < 15**2
    # an under-confident head: 0.3 on the object, 0.1 around it
    prob = np.where(disk, 0.3, 0.1).astype(np.float32)
    s = _sample("distal_tubule", disk)
    table = threshold_table([prob] * 4, [s] * 4)
    row = table["distal_tubule"]
    assert row[0.5] == 0.0 and row[0.1] == pytest.approx(1.0) and row[0.05] < 0.5
    # every threshold in [0.1, 0.3) is perfect: the tie goes to the one nearest 0.5
    assert pick_thresholds(table, {"distal_tubule": 4}) == {"distal_tubule": 0.25}
    # too few patches: the previous threshold is kept
    assert pick_thresholds(table, {"distal_tubule": 3}, previous={"distal_tubule": 0.4}) == {"distal_tubule": 0.4}
    assert pick_thresholds(table, {"distal_tubule": 3}) == {}


def test_patches_annotated_empty_do_not_vote():
    """Exported corrections hold patches where the tissue was erased (annotation
    empty). Each of them scores Dice 1 at a cut that marks nothing, so with a mean over
    all patches three of them drove a fine-tuned artery threshold from 0.05 to 0.90
    and the artery vanished; only patches that show the tissue may choose its cut."""
    yy, xx = np.mgrid[:64, :64]
    disk = (yy - 32) ** 2 + (xx - 32) ** 2 < 15**2
    prob = np.where(disk, 0.3, 0.1).astype(np.float32)
    shown = _sample("artery", disk)
    # the head is faintly on in the erased patches (0.1 .. 0.85): a cut at 0.9 marks nothing there
    empty = [_sample("artery", np.zeros((64, 64), bool)) for _ in range(3)]
    empty_probs = [np.full((64, 64), v, np.float32) for v in (0.1, 0.5, 0.85)]
    table = threshold_table([prob] + empty_probs, [shown] + empty)
    assert table == threshold_table([prob], [shown])
    assert table["artery"][0.9] == 0.0 and table["artery"][0.1] == pytest.approx(1.0)
    assert calibration_counts([shown] + empty) == {"artery": 1}
    # one patch showing the artery is too few to move it: the parent's cut stays
    counts = calibration_counts([shown] + empty)
    assert pick_thresholds(table, counts, previous={"artery": 0.05}) == {"artery": 0.05}
    # four that show it do move it
    table4 = threshold_table([prob] * 4 + empty_probs, [shown] * 4 + empty)
    assert pick_thresholds(table4, calibration_counts([shown] * 4 + empty), previous={"artery": 0.05}) == {"artery": 0.25}
    # an erased patch alone yields no row at all
    assert threshold_table(empty_probs, empty) == {}


def test_thresholds_round_trip_and_bad_ones_are_refused(tmp_path):
    ck = new_checkpoint(seed=0)
    p = save_checkpoint(ck.model, tmp_path / "m.safetensors", ck.tissues, thresholds={"artery": 0.2})
    back = load_checkpoint(p)
    assert back.threshold("artery") == 0.2 and back.threshold(get_tissue("glomerular_unit")) == 0.5
    with pytest.raises(CheckpointError, match="unknown tissue"):
        save_checkpoint(ck.model, tmp_path / "x.safetensors", ck.tissues, thresholds={"liver": 0.2})
    side = json.loads(p.with_suffix(".json").read_text())
    for bad in ({"artery": 1.5}, {"artery": "low"}, ["artery"], {"artery": True}):
        side["thresholds"] = bad
        p.with_suffix(".json").write_text(json.dumps(side))
        with pytest.raises(CheckpointError, match="threshold"):
            load_checkpoint(p)


def test_the_engine_and_patch_prediction_cut_at_the_tissue_threshold(demo_dir):
    s = load_arrays([x for x in select(load_dataset(demo_dir), "test") if x.tissue.name == "distal_tubule"][:1])
    ck = new_checkpoint(seed=3)
    with torch.no_grad():
        ck.model.controller_weight.normal_(0, 0.5)
    src = ImageSlide(s[0].image, mpp=1.0)
    seg = Segmenter(ck, EngineConfig(core=128, margin=16, batch_size=2, skip_background=False))
    fg = {}
    for th in (0.5, 0.05, 0.95):
        ck.thresholds = {"distal_tubule": th}
        res, _ = segment_region(seg, src, None, ["distal_tubule"])
        fg[th] = float((res["distal_tubule"].data == 1).mean())
        assert float(predict_samples(ck, s)[0].mean()) == pytest.approx(fg[th], abs=0.05)
    assert fg[0.05] >= fg[0.5] >= fg[0.95] and fg[0.05] > fg[0.95]


def test_calibrate_cli_finds_the_distal_tubule_on_real_patches(tmp_path):
    """The shipped head is under-confident for distal tubules (Dice 0.20 at 0.5 on the
    test patches); calibration on labelled patches must find a lower threshold that
    segments them, and never make a tissue worse on the patches it was chosen on."""
    from conftest import _write_mini_demo

    data = _write_mini_demo(tmp_path / "patches")  # the 23 real test patches bundled in the package
    out = tmp_path / "cal.safetensors"
    r = subprocess.run([sys.executable, "-m", "napari_omniseg", "calibrate", "-c", str(shipped_checkpoint()),
                        "-d", str(data), "--split", "all", "--min-samples", "3", "--device", "cpu", "-o", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "distal_tubule" in r.stdout and f"wrote {out}" in r.stdout
    base, cal = load_checkpoint(shipped_checkpoint()), load_checkpoint(out)
    base.thresholds = {}  # the uncalibrated model: every tissue at 0.5
    assert cal.threshold("distal_tubule") < 0.5
    assert cal.provenance["calibration"]["n"] >= 16
    for k, v in base.model.state_dict().items():  # same weights
        assert torch.equal(v, cal.model.state_dict()[k]), k
    samples = load_arrays(select(load_dataset(data), None))
    _, before = evaluate_samples(base, samples)
    _, after = evaluate_samples(cal, samples)
    assert after["per_tissue"]["distal_tubule"]["dice"] > before["per_tissue"]["distal_tubule"]["dice"] + 0.1
    for t, v in after["per_tissue"].items():
        assert v["dice"] >= before["per_tissue"][t]["dice"] - 0.006, t


def test_counting_negatives_raises_a_cut_that_marks_excluded_structures():
    """Hand-made: an under-confident head (0.3 on its object) that also gives 0.25 to
    an excluded structure. By Dice alone the cut is 0.2 and marks all of that
    structure; paying for the marked share moves it to 0.25, which keeps the object and
    leaves the structure alone."""
    yy, xx = np.mgrid[:64, :64]
    disk = (yy - 32) ** 2 + (xx - 32) ** 2 < 15**2
    prob = np.where(disk, 0.3, 0.1).astype(np.float32)
    s = _sample("glomerular_unit", disk)
    table = threshold_table([prob] * 4, [s] * 4)
    neg = {"glomerular_unit": {th: (1.0 if th < 0.25 else 0.0) for th in table["glomerular_unit"]}}
    # a plain pick (ties go to the cut nearest 0.5) takes 0.25 here; make the Dice favour 0.2
    table["glomerular_unit"][0.2] = 1.0
    table["glomerular_unit"][0.25] = 0.98
    assert pick_thresholds(table, {"glomerular_unit": 4}) == {"glomerular_unit": 0.2}
    pen = penalised_table(table, neg)
    assert pen["glomerular_unit"][0.2] == pytest.approx(0.0) and pen["glomerular_unit"][0.25] == pytest.approx(0.98)
    assert pick_thresholds(pen, {"glomerular_unit": 4}) == {"glomerular_unit": 0.25}
    # a tissue without negatives keeps its Dice
    assert penalised_table({"artery": {0.5: 0.7}}, neg) == {"artery": {0.5: 0.7}}


def test_negative_table_measures_the_share_a_real_head_marks(demo_dir):
    """The shipped model on real negatives (demo patches of tissues that exclude the
    glomerular unit, resampled to 5x): the share marked falls as the cut rises, lies in
    [0, 1], and only the excluded structure's pixels count."""
    from napari_omniseg.tissues import with_registry_relations
    from napari_omniseg.training.negatives import cross_scale_negatives

    ck = load_checkpoint(shipped_checkpoint())
    s = load_arrays(select(load_dataset(demo_dir), ["train", "val", "test"]))
    negs = [n for n in cross_scale_negatives(s, with_registry_relations(ck.tissues)) if n.tissue.name == "glomerular_unit"]
    assert negs
    negs = negs[:4]
    grid = (0.05, 0.5, 0.9)
    tab = negative_table(ck, negs, grid)
    row = tab["glomerular_unit"]
    assert 0.0 <= row[0.9] <= row[0.5] <= row[0.05] <= 1.0
    # only the excluded structure's pixels are known: a negative without any counts for nothing
    import copy

    empty = copy.copy(negs[0])
    empty.target = np.full_like(negs[0].target, -1)
    assert negative_table(ck, [empty], grid) == {}


def test_calibrate_cli_counting_negatives_on_real_patches(tmp_path):
    """`omniseg calibrate --count-negatives` as a user runs it on the 23 bundled real
    patches: the sidecar says how the cuts were chosen and holds the penalised table,
    and no cut is lower than the Dice-only cut by more than the tie rule allows."""
    from conftest import _write_mini_demo

    from napari_omniseg.training.calibrate import probability_maps

    data = _write_mini_demo(tmp_path / "patches")
    out = tmp_path / "cal-neg.safetensors"
    r = subprocess.run([sys.executable, "-m", "napari_omniseg", "calibrate", "-c", str(shipped_checkpoint()),
                        "-d", str(data), "--split", "all", "--min-samples", "3", "--device", "cpu",
                        "--count-negatives", "-o", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "Dice - marked share" in r.stdout and f"wrote {out}" in r.stdout
    cal = load_checkpoint(out).provenance["calibration"]
    assert cal["count_negatives"] is True and "dice_by_threshold" not in cal
    pen = cal["dice_minus_marked_by_threshold"]
    # the glomerular unit has negatives (tubules and arteries at 5x): its penalised
    # score lies below its plain Dice at low cuts, where the head marks most
    samples = load_arrays(select(load_dataset(data), None))
    ck = load_checkpoint(shipped_checkpoint())
    plain = threshold_table(probability_maps(ck, samples), samples)
    assert pen["glomerular_unit"]["0.05"] < plain["glomerular_unit"][0.05] - 0.01
    for t, row in pen.items():
        for k, v in row.items():
            assert v <= plain[t][float(k)] + 1e-4, (t, k)
