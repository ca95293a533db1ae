"""benchmarks/compare_methods.py --rerender: merging saved runs into one table, and
refusing runs that cannot share one (no training here: the JSON is written by the test)."""

import importlib.util
import json
from pathlib import Path

import pytest

from napari_omniseg.tissues import TISSUES

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cm():
    spec = importlib.util.spec_from_file_location("compare_methods", ROOT / "benchmarks" / "compare_methods.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(method, seed, dice):
    per = {t.name: {"n": 1, "dice": dice, "hd_um": 10.0, "hd95_um": 5.0, "msd_um": 2.0, "n_undefined_distance": 0}
           for t in TISSUES}
    return {"method": method, "seed": seed, "n_parameters": 1000, "train_s": 60.0, "load_1min": [1.0, 1.0],
            "infer_ms_per_tile": 100.0, "infer_batch": 8, "infer_tile": [256, 256],
            "summary": {"per_tissue": per, "mean_dice": dice, "mean_hd95_um": 5.0, "mean_msd_um": 2.0},
            "rows": [], "history": {}}


def _save(path, command, runs, machine="m1"):
    counts = {"n_train": 68, "n_val": 19, "n_test": 23, "test": {}}
    path.write_text(json.dumps({"command": command, "machine": machine, "started": "s", "load_average": "0",
                                "counts": counts, "runs": runs}))
    return str(path)


BASE = "python benchmarks/compare_methods.py --epochs 30 --threads 1"


def test_merge_of_two_seed_runs_gives_mean_and_sd(cm, tmp_path):
    a = _save(tmp_path / "a.json", f"{BASE} --out-json a.json", [_run("omniseg", 1, 0.2), _run("multi_network", 1, 0.4)])
    b = _save(tmp_path / "b.json", f"{BASE} --seed 2 --out-json b.json", [_run("omniseg", 2, 0.4), _run("multi_network", 2, 0.4)])
    out = tmp_path / "r.md"
    assert cm.main(["--rerender", a, b, "--out-md", str(out)]) == 0
    text = out.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| Omni-Seg"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "2" and cells[8] == "0.300 ± 0.141"  # runs, mean Dice over seeds 1 and 2
    assert f"{BASE} --out-json a.json" in text and f"{BASE} --seed 2 --out-json b.json" in text


def test_merge_refuses_other_settings_duplicates_and_machines(cm, tmp_path):
    a = _save(tmp_path / "a.json", BASE, [_run("omniseg", 1, 0.2)])
    other = _save(tmp_path / "b.json", BASE.replace("30", "60") + " --seed 2", [_run("omniseg", 2, 0.2)])
    with pytest.raises(SystemExit, match="settings differ"):
        cm.main(["--rerender", a, other, "--out-md", str(tmp_path / "r.md")])
    dup = _save(tmp_path / "c.json", BASE, [_run("omniseg", 1, 0.3)])
    with pytest.raises(SystemExit, match="already in an earlier file"):
        cm.main(["--rerender", a, dup, "--out-md", str(tmp_path / "r.md")])
    mach = _save(tmp_path / "d.json", BASE + " --seed 3", [_run("omniseg", 3, 0.3)], machine="m2")
    with pytest.raises(SystemExit, match="another machine"):
        cm.main(["--rerender", a, mach, "--out-md", str(tmp_path / "r.md")])
    assert not (tmp_path / "r.md").exists()


def test_multi_network_selected_per_tissue_gets_its_own_row(cm, tmp_path):
    """A multi-network kept per tissue (the rule that favours it) is never averaged with
    one kept at the common rule: each has a row, and the text says which is which."""
    own = _run("multi_network", 1, 0.5)
    own["history"] = {"best_epoch": {t.name: 30 for t in TISSUES}}
    common = _run("multi_network", 1, 0.3)
    common["history"] = {"best_epoch": {"all": 25}}
    a = _save(tmp_path / "a.json", f"{BASE} --selection own", [own, _run("omniseg", 1, 0.4)])
    b = _save(tmp_path / "b.json", f"{BASE} --methods multi_network", [common])
    out = tmp_path / "r.md"
    assert cm.main(["--rerender", a, b, "--out-md", str(out)]) == 0
    text = out.read_text()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines()
            if line.startswith("| Multi-network") and line.count("|") > 14}  # the Dice table's rows
    assert set(rows) == {cm.LABELS["multi_network"], cm.LABELS[cm.OWN]}
    mean_dice = lambda line: [c.strip() for c in line.strip("|").split("|")][8]  # noqa: E731
    assert mean_dice(rows[cm.LABELS[cm.OWN]]) == "0.500" and mean_dice(rows[cm.LABELS["multi_network"]]) == "0.300"
    assert "the same rule for every method" in text
    alone = _save(tmp_path / "c.json", BASE, [own])
    assert cm.main(["--rerender", alone, "--out-md", str(out)]) == 0
    assert "a rule that favours it" in out.read_text() and "the same rule for every method" not in out.read_text()


def test_calibrated_omniseg_is_not_averaged_with_a_plain_cut(cm, tmp_path):
    """The baselines cut at 0.5; an Omni-Seg run with calibrated thresholds gets a row
    of its own and the text says it had that advantage."""
    cal = _run("omniseg", 1, 0.45)
    cal["history"] = {"thresholds": {t.name: (0.05 if t.name == "artery" else 0.5) for t in TISSUES}}
    plain = _run("omniseg", 1, 0.40)
    plain["history"] = {"thresholds": {t.name: 0.5 for t in TISSUES}}
    a = _save(tmp_path / "a.json", BASE, [cal])
    b = _save(tmp_path / "b.json", f"{BASE} --methods omniseg", [plain])
    out = tmp_path / "r.md"
    assert cm.main(["--rerender", a, b, "--out-md", str(out)]) == 0
    text = out.read_text()
    labels = {line.split("|")[1].strip() for line in text.splitlines()
              if line.startswith("| Omni-Seg") and line.count("|") > 14}
    assert labels == {cm.LABELS["omniseg"], cm.LABELS[cm.CAL]}
    assert "an advantage the baselines do not get" in text


@pytest.mark.parametrize("method", ["omniseg", "multi_network"])
def test_calibrate_scores_the_same_networks_both_ways(cm, method, demo_dir):
    """--calibrate trains once and gives two records: every tissue cut at 0.5 (no
    thresholds) and the same networks at thresholds chosen on train + validation."""
    import dataclasses
    import types

    from napari_omniseg.training.data import load_arrays, load_dataset, select

    s = load_arrays(select(load_dataset(demo_dir), "train", tissues=["glomerular_unit"])[:2])
    pats = [dataclasses.replace(p, image=p.image[96:160, 96:160].copy(), mask=p.mask[96:160, 96:160].copy()) for p in s]
    a = types.SimpleNamespace(epochs=1, crop=32, batch_size=2, optimizer="adamw", lr=3e-3, threads=1, val_every=1,
                              calibrate=True, selection="mean", infer_batch=2, infer_repeats=1, head_channels=8)
    recs = cm.run_one(method, 0, pats[:1], pats[1:], pats, a)
    assert [r["history"]["calibrated"] for r in recs] == [False, True]
    assert recs[0]["history"]["thresholds"] == {}
    assert recs[0]["train_s"] == recs[1]["train_s"]  # one training, scored twice
    assert {cm.row_of(r) for r in recs} == {method, f"{method}_calibrated"}
    a.calibrate = False
    assert len(cm.run_one(method, 0, pats[:1], pats[1:], pats, a)) == 1
    # the multi-class decision is an argmax: nothing to calibrate, one record
    a.calibrate = True
    assert len(cm.run_one("multiclass", 0, pats[:1], pats[1:], pats, a)) == 1
