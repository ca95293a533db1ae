"""Anatomy-aware partial labels, foreground-aware crops, balanced batches, resampled imports.

All on hand-made masks whose right answer is known pixel by pixel.
"""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_omniseg.tissues import TISSUES, Tissue, contains, exclusive, get_tissue
from napari_omniseg.training.augment import AugmentConfig, augment, object_crop
from napari_omniseg.training.data import Sample, load_arrays, load_dataset
from napari_omniseg.training.losses import partial_label_loss
from napari_omniseg.training.loop import make_balanced_batches
from napari_omniseg.training.relations import UNKNOWN, build_targets, combine, derived_target

DT, PT, UNIT, TUFT, ART, PTC = (get_tissue(n) for n in (
    "distal_tubule", "proximal_tubule", "glomerular_unit", "glomerular_tuft", "artery", "peritubular_capillary"))


def disk(n=32, r=8, cy=16, cx=16):
    yy, xx = np.mgrid[:n, :n]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def sample(tissue, mask, image=None, seed=0):
    if image is None:
        image = np.random.default_rng(seed).integers(0, 255, mask.shape + (3,), dtype=np.uint8)
    return Sample(Path(f"{tissue.short}-{seed}.png"), Path("m.png"), tissue, image=image, mask=mask)


def test_registry_relations():
    assert contains(UNIT, TUFT) and not contains(TUFT, UNIT)
    assert exclusive(DT, PT) and exclusive(PT, DT) and exclusive(DT, ART)
    assert not exclusive(UNIT, TUFT), "the tuft lies inside the unit: they share pixels"
    assert Tissue.from_dict(DT.to_dict()) == DT


def test_tuft_label_makes_unit_foreground_and_nothing_else():
    m = disk()
    t = derived_target(TUFT, m, UNIT)
    assert (t[m] == 1).all() and (t[~m] == UNKNOWN).all()


def test_unit_label_makes_tuft_background_outside_only():
    m = disk(r=12)
    t = derived_target(UNIT, m, TUFT)
    assert (t[~m] == 0).all() and (t[m] == UNKNOWN).all()


def test_exclusive_tissues_are_background_on_the_labelled_object():
    m = disk()
    for other in (PT, ART):
        t = derived_target(DT, m, other)
        assert (t[m] == 0).all() and (t[~m] == UNKNOWN).all()


def test_other_magnifications_learn_nothing():
    m = disk()
    assert derived_target(DT, m, PTC) is None  # 40x capillary from a 10x tubule image
    assert derived_target(DT, m, UNIT) is None  # 5x unit from a 10x image


def test_own_tissue_is_known_everywhere():
    m = disk()
    t = derived_target(DT, m, DT)
    assert set(np.unique(t)) == {0, 1} and (t == m).all()


def test_contradictions_become_unknown():
    a = np.array([[1, 0, UNKNOWN, 1]], np.int8)
    b = np.array([[1, 1, 0, UNKNOWN]], np.int8)
    assert combine([a, b]).tolist() == [[1, UNKNOWN, 0, 1]]


def test_identical_crops_merge_into_multi_tissue_labels():
    unit, tuft = disk(r=12), disk(r=6)
    img = np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    s_unit, s_tuft = sample(UNIT, unit, img.copy()), sample(TUFT, tuft, img.copy())
    other = sample(UNIT, disk(r=4), seed=5)  # different pixels: not merged
    tg = build_targets([s_unit, s_tuft, other], TISSUES)
    for t in tg[:2]:  # both copies now know both tissues everywhere
        assert (t[UNIT.id] == unit).all() and (t[TUFT.id] == tuft).all()
    assert set(tg[2]) == {UNIT.id, TUFT.id}
    assert (tg[2][TUFT.id][disk(r=4)] == UNKNOWN).all() and (tg[2][TUFT.id][~disk(r=4)] == 0).all()
    # 10x and 40x tissues are never informed by a 5x image
    assert not {DT.id, PT.id, ART.id, PTC.id} & set(tg[0])


def test_a_seventh_tissue_with_its_own_relation_needs_no_code_change():
    mes = Tissue(6, "mesangium", "mes", "Mesangium", 5, "#00ff00", inside="glomerular_tuft")
    tissues = TISSUES + (mes,)
    tuft = disk(r=6)
    tg = build_targets([sample(TUFT, tuft)], tissues)
    assert (tg[0][mes.id][~tuft] == 0).all() and (tg[0][mes.id][tuft] == UNKNOWN).all()
    # and a new exclusive tissue at 10x is background on a labelled distal tubule
    fib = Tissue(6, "fibrosis", "fib", "Fibrosis", 10, "#888888", excludes=("distal_tubule",))
    dt = disk()
    tg = build_targets([sample(DT, dt)], TISSUES + (fib,))
    assert (tg[0][fib.id][dt] == 0).all() and (tg[0][fib.id][~dt] == UNKNOWN).all()


def test_loss_ignores_unknown_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 2, 16, 16, requires_grad=True)
    y = torch.full((2, 2, 16, 16), -1, dtype=torch.int8)
    y[:, 0, :8] = 1
    y[:, 0, 8:] = 0
    y[:, 1, :4] = 0  # a derived column known only on a strip
    loss = partial_label_loss(logits, y)
    loss.backward()
    g = logits.grad
    assert g[:, 1, :, 4:].abs().max() == 0, "unknown pixels must get no gradient"
    assert g[:, 1, :, :4].abs().max() > 0 and g[:, 0].abs().max() > 0
    # changing logits where the target is unknown does not change the loss
    other = logits.detach().clone()
    other[:, 1, :, 4:] += 5.0
    assert torch.isclose(partial_label_loss(other, y), loss.detach())


def test_loss_prefers_the_right_answer_and_an_empty_crop_is_not_rewarded():
    y = torch.zeros((2, 1, 8, 8), dtype=torch.int8)
    y[0, 0, 2:6, 2:6] = 1  # one crop holds the object, the other is empty
    right = torch.zeros(2, 1, 2, 8, 8)
    right[:, :, 1] = torch.where(y.bool(), 6.0, -6.0).float()
    empty = torch.zeros(2, 1, 2, 8, 8)
    empty[:, :, 1] = -6.0
    assert partial_label_loss(right, y) < 0.1 < partial_label_loss(empty, y)


def test_object_crops_contain_the_object():
    rng = np.random.default_rng(0)
    img = np.zeros((256, 256, 3), np.float32)
    lab = np.zeros((256, 256, 1), np.int8)
    lab[200:210, 20:30] = 1  # a small object near a corner
    hits = 0
    for _ in range(200):
        _, c = object_crop(img, lab, 64, rng, lab[..., 0] == 1, 1.0)
        assert c.shape == (64, 64, 1)
        hits += bool((c == 1).any())
    assert hits == 200
    uniform = sum(bool((object_crop(img, lab, 64, rng, lab[..., 0] == 1, 0.0)[1] == 1).any()) for _ in range(200))
    assert uniform < 60, uniform  # uniform crops miss it most of the time


def test_augment_moves_label_maps_with_the_image_and_keeps_their_values():
    rng = np.random.default_rng(3)
    img = np.zeros((64, 64, 3), np.float32)
    img[10:30, 10:30, 0] = 1.0
    lab = np.full((64, 64, 2), -1, np.int8)
    lab[10:30, 10:30, 0] = 1
    lab[..., 1] = 0
    cfg = AugmentConfig(p_geometric=1.0, p_color=0.0, p_noise=0.0)
    for _ in range(10):
        a, b = augment(img, lab, rng, cfg)
        assert b.dtype == np.int8 and set(np.unique(b[..., 0])) <= {-1, 1} and set(np.unique(b[..., 1])) == {0}
        red = a[..., 0] > 0.5
        if red.sum() > 50:  # the object and its label stay together
            assert ((b[..., 0] == 1) & red).sum() / red.sum() > 0.9


def test_balanced_batches_give_every_tissue_the_same_number():
    samples = [sample(DT, disk(), seed=i) for i in range(3)] + [sample(PT, disk(), seed=10 + i) for i in range(20)]
    b = make_balanced_batches(samples, 4, np.random.default_rng(0))
    per = {}
    for batch in b:
        assert len({samples[i].tissue.id for i in batch}) == 1
        per[samples[batch[0]].tissue.id] = per.get(samples[batch[0]].tissue.id, 0) + 1
    assert per[DT.id] == per[PT.id]
    dt_seen = {i for batch in b for i in batch if samples[i].tissue.id == DT.id}
    assert dt_seen == {0, 1, 2}


def test_third_party_patches_are_resampled_to_the_tissue_magnification(tmp_path):
    import imageio.v3 as iio

    # a 20x tile (0.5 um/px) with a 100 um glomerulus, imported for the 5x glomerular unit (2 um/px)
    n = 512
    m = disk(n=n, r=100, cy=256, cx=256)
    img = np.where(m[..., None], 200, 60).astype(np.uint8).repeat(3, axis=2)
    iio.imwrite(tmp_path / "t.png", img)
    iio.imwrite(tmp_path / "t_mask.png", (m * 255).astype(np.uint8))
    with open(tmp_path / "index.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_path", "label_path", "tissue", "um_per_px", "stain"])
        w.writerow(["t.png", "t_mask.png", "glomerular_unit", "0.5", "pas"])
    (s,) = load_arrays(load_dataset(tmp_path / "index.csv"))
    assert s.image.shape == (128, 128, 3) and s.mask.shape == (128, 128)
    area_um2_before = m.sum() * 0.5**2
    area_um2_after = s.mask.sum() * 2.0**2
    assert abs(area_um2_after / area_um2_before - 1) < 0.03
    assert s.meta["resampled_from_mpp"] == 0.5 and s.stain == "pas"


def test_a_bad_pixel_size_is_named(tmp_path):
    import imageio.v3 as iio

    from napari_omniseg.training.data import DataError

    iio.imwrite(tmp_path / "t.png", np.zeros((8, 8, 3), np.uint8))
    iio.imwrite(tmp_path / "t_mask.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "index.csv").write_text("image_path,label_path,tissue,um_per_px\nt.png,t_mask.png,glomerular_unit,-1\n")
    with pytest.raises(DataError, match="um_per_px"):
        load_arrays(load_dataset(tmp_path / "index.csv"))


# ------------------------------------------------------------- negatives across magnifications
def test_a_10x_artery_is_a_half_size_negative_for_the_5x_heads_and_nothing_for_40x():
    from napari_omniseg.training.negatives import cross_scale_negatives

    m = disk(n=256, r=40, cy=128, cx=128)
    negs = cross_scale_negatives([sample(ART, m)], TISSUES)
    assert sorted(n.tissue.name for n in negs) == ["glomerular_tuft", "glomerular_unit"]
    for n in negs:  # 10x -> 5x: half the side; the artery (radius 20 px now) is background, the rest unknown
        assert n.image.shape == (128, 128, 3) and n.target.shape == (128, 128)
        assert n.target[64, 64] == 0 and n.target[0, 0] == UNKNOWN
        assert abs(int((n.target == 0).sum()) - np.pi * 20 ** 2) < 60
        assert set(np.unique(n.target)) == {0, UNKNOWN}


def test_a_5x_glomerulus_is_a_double_size_negative_for_the_10x_heads_it_excludes():
    from napari_omniseg.training.negatives import cross_scale_negatives, summary

    m = disk(n=128, r=20, cy=64, cx=64)
    negs = cross_scale_negatives([sample(UNIT, m), sample(TUFT, m, seed=1)], TISSUES)
    # the unit excludes the tubules and the artery (10x); the 40x capillary is 8x away: none
    assert summary(negs) == {"distal_tubule": {"glomerular_unit": 1, "glomerular_tuft": 1},
                             "proximal_tubule": {"glomerular_unit": 1, "glomerular_tuft": 1},
                             "artery": {"glomerular_unit": 1, "glomerular_tuft": 1}}
    assert all(n.image.shape[:2] == (256, 256) and n.target[128, 128] == 0 for n in negs)
    # an empty mask gives nothing; a new tissue's exclusion is followed without code changes
    assert cross_scale_negatives([sample(UNIT, np.zeros((128, 128), bool))], TISSUES) == []
    fib = Tissue(6, "fibrosis", "fib", "Fibrosis", 10, "#888888", excludes=("glomerular_unit",))
    got = cross_scale_negatives([sample(UNIT, m)], TISSUES + (fib,))
    assert "fibrosis" in {n.tissue.name for n in got}


def test_negative_batches_give_each_head_its_batches():
    from napari_omniseg.training.negatives import cross_scale_negatives, negative_batches

    m = disk(n=128, r=20, cy=64, cx=64)
    negs = cross_scale_negatives([sample(UNIT, m, seed=k) for k in range(3)], TISSUES)
    b = negative_batches(negs, 2, 2, np.random.default_rng(0))
    assert len(b) == 3 * 2 and all(len(x) == 2 for x in b)
    assert all(len({negs[i].tissue.id for i in x}) == 1 for x in b)


def test_a_checkpoint_without_relations_trains_with_the_registry_ones():
    """The shipped model's stored tissues have no ``excludes``: training adds the
    registry's, so the tuft head gets its negatives from a 10x artery too."""
    from napari_omniseg.model import load_checkpoint, resolve_checkpoint
    from napari_omniseg.tissues import with_registry_relations
    from napari_omniseg.training.negatives import cross_scale_negatives

    stored = load_checkpoint(resolve_checkpoint(None)).tissues
    merged = with_registry_relations(stored)
    assert [t.name for t in merged] == [t.name for t in stored]
    m = disk(n=256, r=40, cy=128, cx=128)
    assert {n.tissue.name for n in cross_scale_negatives([sample(ART, m)], merged)} == {"glomerular_unit", "glomerular_tuft"}
    mes = Tissue(6, "mesangium", "mes", "Mesangium", 5, "#00ff00", inside="glomerular_tuft")
    assert with_registry_relations((mes,)) == (mes,)  # unknown to the registry: unchanged


def test_glass_edge_turns_part_of_a_crop_into_background_glass_and_keeps_the_rest():
    from napari_omniseg.training.loop import glass_edge

    rng = np.random.default_rng(5)
    img = np.random.default_rng(6).uniform(0.2, 0.6, (64, 64, 3)).astype(np.float32)  # all tissue
    lab = np.full((64, 64, 2), UNKNOWN, np.int8)
    lab[..., 0] = 1  # the labelled tissue everywhere; the second column unknown
    shares = []
    for _ in range(30):
        out, got = glass_edge(img, lab, rng)
        glass = out.min(-1) > 0.85
        kept = np.all(out == img, axis=-1)
        assert np.array_equal(glass, ~kept)  # every pixel is either the crop's own or glass
        assert np.all(got[glass] == 0)  # glass is background for every column, known ones and unknown
        assert np.array_equal(got[kept], lab[kept])  # the tissue left keeps its labels
        assert kept.any(axis=1).sum() >= 1 and glass.any()
        shares.append(glass.mean())
    assert 0.15 < min(shares) and max(shares) < 0.8 and np.ptp(shares) > 0.3
    # single-mask labels (the reference loss) work the same way
    out, got = glass_edge(img, np.ones((64, 64), np.uint8), rng)
    assert got.dtype == np.uint8 and np.array_equal(got == 0, out.min(-1) > 0.85)


def test_both_batch_builders_put_glass_edges_in_crops_when_asked():
    from napari_omniseg.training.loop import TrainConfig, _batch_tensors, _target_batch

    rng = np.random.default_rng(1)
    m = disk(n=96, r=30, cy=48, cx=48)
    samples = [sample(UNIT, m, image=rng.integers(20, 150, (96, 96, 3), dtype=np.uint8), seed=k) for k in range(2)]
    targets = build_targets(samples, TISSUES)
    for p in (0.0, 1.0):
        cfg = TrainConfig(crop=64, augment=False, glass_edge=p)
        x, y, _w = _batch_tensors(samples, [0, 1], cfg, np.random.default_rng(2), train=True)
        glass = x.amin(1) > 0.85
        assert bool(glass.any()) == (p > 0)
        assert torch.all(y[glass] == 0)
        x, y, _w, _tids = _target_batch(samples, targets, [0, 1], cfg, np.random.default_rng(2))
        glass = x.amin(1) > 0.85
        assert bool(glass.any()) == (p > 0)
        assert torch.all(y.permute(0, 2, 3, 1)[glass] == 0)
