"""The review queue: scores from the engine, stored with the segmentation, ranked and spread."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from napari_omniseg.inference.plan import make_plans
from napari_omniseg.labels.review import FIELDS, block_scores, suggest
from napari_omniseg.labels.store import LabelStore
from napari_omniseg.tissues import get_tissue

UNIT, TUFT = get_tissue("glomerular_unit"), get_tissue("glomerular_tuft")
DT, PT = get_tissue("distal_tubule"), get_tissue("proximal_tubule")


def test_block_scores_on_hand_made_probabilities():
    h = w = 8
    prob = np.zeros((2, h, w), np.float32)
    prob[0, :, :4] = 0.5  # unit: half the block at p = 0.5 (1 bit each), the rest certain background
    prob[1, :2, :] = 0.99  # tuft: two rows, half of them outside any unit pixel
    labels = {"glomerular_unit": (prob[0] > 0.5).astype(np.uint8), "glomerular_tuft": (prob[1] > 0.5).astype(np.uint8)}
    labels["glomerular_unit"][:2, :4] = 1
    s = block_scores(prob, labels, [UNIT, TUFT])
    ent, unc, vio, fg = s["glomerular_unit"]
    assert ent == pytest.approx(0.5, abs=1e-3) and unc == pytest.approx(0.5)
    assert fg == pytest.approx(8 / 64)
    # the tuft: 16 pixels, 8 of them outside the unit -> half of its pixels break "tuft inside unit"
    assert s["glomerular_tuft"][2] == pytest.approx(0.5)
    # the unit is missing under those 8 tuft pixels: counted for the unit as well
    assert vio == pytest.approx(8 / 8)
    # exclusive tissues on one pixel
    p2 = np.full((2, 4, 4), 0.9, np.float32)
    l2 = {"distal_tubule": np.ones((4, 4), np.uint8), "proximal_tubule": np.ones((4, 4), np.uint8)}
    s2 = block_scores(p2, l2, [DT, PT])
    assert s2["distal_tubule"][2] == pytest.approx(1.0) and s2["proximal_tubule"][2] == pytest.approx(1.0)
    assert list(FIELDS) == ["entropy", "uncertain", "violation", "foreground"]


def _store_with_scores(tmp_path, scores):
    """A store (one tissue, 64 px blocks at 10x over a 1 um/px... 0.5 um/px slide) with given entropy per block."""
    st = LabelStore.create(tmp_path / "s.ome.zarr", [DT], (1024, 1024), 0.5, 64, {"source": "x.svs"})
    (plan,) = make_plans([DT], (1024, 1024), 0.5, core=64, margin=8)
    for (bi, bj), e in scores.items():
        st.write_scores(plan, bi, bj, {DT.name: [e, 0.0, 0.0, 0.1]})
    st.flush()  # scores are held and written a row at a time with the record of finished blocks
    return st, plan


def test_ranking_order_spread_and_reviewed_on_a_hand_made_store(tmp_path):
    scores = {(0, 0): 0.9, (0, 1): 0.85, (5, 5): 0.5, (7, 0): 0.7, (3, 7): 0.1}
    st, plan = _store_with_scores(tmp_path, scores)
    a = np.asarray(st.root["review"][DT.name][...])
    assert a.shape == (*plan.n_blocks, 4) and np.isnan(a[1, 1, 0]) and a[0, 0, 0] == pytest.approx(0.9)
    f = plan.factor  # level-0 px per 10x px
    box = lambda bi, bj: (int(bj * 64 * f), int(bi * 64 * f))  # noqa: E731
    got = suggest(st, n=10)
    # (0, 1) is a neighbour of (0, 0): spread out of the queue
    assert [(s.x, s.y) for s in got] == [box(0, 0), box(7, 0), box(5, 5), box(3, 7)]
    assert [s.rank for s in got] == [1, 2, 3, 4] and got[0].score == pytest.approx(0.9)
    assert "score 0.90" in got[0].why()
    assert len(suggest(st, n=10, spread=0)) == 5
    # a committed region over the first block takes it out; its neighbour comes back
    x, y = box(0, 0)
    got2 = suggest(st, n=10, reviewed=[("distal_tubule", (x, y, int(64 * f), int(64 * f)))])
    assert [(s.x, s.y) for s in got2][:2] == [box(0, 1), box(7, 0)]
    assert len(suggest(st, n=2)) == 2


def test_tissues_take_turns_in_the_queue(tmp_path):
    """One tissue unsure everywhere must not fill the queue: each tissue's best block
    comes before any tissue's second (unless ranked by score alone)."""
    st = LabelStore.create(tmp_path / "t.ome.zarr", [DT, PT], (1024, 1024), 0.5, 64, {"source": "x.svs"})
    (plan,) = make_plans([DT, PT], (1024, 1024), 0.5, core=64, margin=8)
    for k, (bi, bj) in enumerate([(0, 0), (0, 4), (4, 0), (4, 4)]):
        st.write_scores(plan, bi, bj, {DT.name: [0.9 - 0.01 * k, 0, 0, 0.1], PT.name: [np.nan] * 4})
    st.write_scores(plan, 7, 7, {PT.name: [0.3, 0, 0, 0.1], DT.name: [np.nan] * 4})
    st.flush()
    turns = [s.tissue for s in suggest(st, n=5)]
    assert turns == ["distal_tubule", "proximal_tubule", "distal_tubule", "distal_tubule", "distal_tubule"]
    assert [s.tissue for s in suggest(st, n=5, balance=False)][-1] == "proximal_tubule"


def test_entropy_is_taken_relative_to_the_tissue_threshold():
    prob = np.full((1, 4, 4), 0.1, np.float32)  # every pixel on a calibrated threshold of 0.1
    lab = {"distal_tubule": np.zeros((4, 4), np.uint8)}
    at_half = block_scores(prob, lab, [DT])["distal_tubule"][0]
    at_th = block_scores(prob, lab, [DT], thresholds={"distal_tubule": 0.1})["distal_tubule"][0]
    assert at_half == pytest.approx(0.469, abs=1e-3) and at_th == pytest.approx(1.0, abs=1e-3)


def _cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "napari_omniseg", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_segment_stores_scores_and_suggest_ranks_them(tmp_path, demo_dir):
    """A real slide from demo patches: segment (CLI), scores stored, `omniseg suggest` prints them."""
    from napari_omniseg.model import new_checkpoint, save_checkpoint
    from napari_omniseg.slides import write_ome_tiff_pyramid
    from napari_omniseg.training.data import load_arrays, load_dataset, select

    ck = new_checkpoint(seed=0)
    with torch.no_grad():
        ck.model.controller_weight.normal_(0, 0.5)
    ckpt = save_checkpoint(ck.model, tmp_path / "m.safetensors")
    s = load_arrays([x for x in select(load_dataset(demo_dir), None) if x.tissue.magnification == 10][:2])
    img = np.full((320, 600, 3), 250, np.uint8)
    img[30:286, 20:276] = s[0].image
    img[30:286, 320:576] = s[1].image
    slide = tmp_path / "mosaic.ome.tif"
    write_ome_tiff_pyramid(slide, img, mpp=1.0, n_levels=1, tile=128)
    out = tmp_path / "seg.ome.zarr"
    r = _cli("segment", slide, "-o", out, "-c", ckpt, "--tissues", "dt", "pt", "--tile", "64", "--margin", "16", "-q")
    assert r.returncode == 0, r.stderr
    st = LabelStore(out)
    for name in ("distal_tubule", "proximal_tubule"):
        a = np.asarray(st.root["review"][name][...])
        run = np.isfinite(a[..., 0])
        assert run.any() and ((a[run, 0] >= 0) & (a[run, 0] <= 1)).all()
    r = _cli("suggest", out, "-n", "5", "--json", "--geojson", tmp_path / "q.geojson")
    assert r.returncode == 0, r.stderr
    sugs = json.loads(r.stdout)
    assert 1 <= len(sugs) <= 5 and [s["rank"] for s in sugs] == list(range(1, len(sugs) + 1))
    for name in ("distal_tubule", "proximal_tubule"):  # tissues take turns; each one's best first
        own = [s["score"] for s in sugs if s["tissue"] == name]
        assert own == sorted(own, reverse=True)
    r = _cli("suggest", out, "-n", "5", "--json", "--by-score")
    assert r.returncode == 0, r.stderr
    by = json.loads(r.stdout)
    assert all(a["score"] >= b["score"] for a, b in zip(by, by[1:]))
    fc = json.loads((tmp_path / "q.geojson").read_text())
    assert len(fc["features"]) == len(sugs)
    r = _cli("suggest", out, "-n", "3")
    assert r.returncode == 0 and r.stdout.splitlines()[0].split()[:2] == ["rank", "tissue"]


def test_glass_the_engine_clears_never_heads_the_queue(tmp_path, demo_dir):
    """A head that sits on its threshold everywhere (probability 0.5) is maximally unsure on glass too;
    the engine clears that glass to background, so its blocks score as certain and the queue's
    regions all lie on the tissue."""
    from napari_omniseg.model import new_checkpoint, save_checkpoint
    from napari_omniseg.slides import write_ome_tiff_pyramid
    from napari_omniseg.training.data import load_arrays, load_dataset, select

    ck = new_checkpoint(seed=0)
    with torch.no_grad():  # no head parameters: logit 0, probability 0.5 on every pixel
        for p in (ck.model.controller_weight, ck.model.controller_bias, ck.model.controller_pair_bias):
            p.zero_()
    ckpt = save_checkpoint(ck.model, tmp_path / "flat.safetensors")
    s = load_arrays([x for x in select(load_dataset(demo_dir), None) if x.tissue.magnification == 10][:1])
    img = np.full((512, 768, 3), 245, np.uint8)  # glass, a little grey as scanners give it
    img[0:256, 0:256] = s[0].image
    slide = tmp_path / "glass.ome.tif"
    write_ome_tiff_pyramid(slide, img, mpp=1.0, n_levels=1, tile=128)
    out = tmp_path / "seg.ome.zarr"
    r = _cli("segment", slide, "-o", out, "-c", ckpt, "--tissues", "pt", "--tile", "64", "--margin", "16", "-q")
    assert r.returncode == 0, r.stderr
    a = np.asarray(LabelStore(out).root["review"]["proximal_tubule"][...])  # (rows, cols, fields), 64 px blocks
    ent = a[..., 0]
    assert np.isfinite(ent[:4, :4]).all() and ent[:4, :4].min() > 0.5  # on the tissue the head is unsure
    glass = np.zeros(ent.shape, bool)
    glass[5:, :] = glass[:, 5:] = True  # blocks at least one block away from the tissue
    glass &= np.isfinite(ent)
    assert glass.sum() >= 20
    assert ent[glass].max() < 0.05, ent[glass].max()
    r = _cli("suggest", out, "-n", "3", "--json")
    assert r.returncode == 0, r.stderr
    sugs = json.loads(r.stdout)
    assert sugs
    for q in sugs:  # every region's box starts on the tissue (level-0 px)
        x0, y0 = q["x"], q["y"]
        assert x0 < 256 and y0 < 256, q
