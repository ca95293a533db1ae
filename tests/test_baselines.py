"""The paper's baselines: shapes, sizes, the TAL and multi-class losses, and that each
one learns on real patches with the shared recipe."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from napari_omniseg.model.network import Backbone, NetConfig, OmniSegNet, count_parameters
from napari_omniseg.training.baselines import (
    BASELINES,
    BinaryUNet,
    build_model,
    evaluate_baseline,
    merged_logit,
    multiclass_loss,
    multiclass_target,
    soft_dice_loss,
    tal_loss,
    train_baseline,
)
from napari_omniseg.training.data import load_arrays, load_dataset, select
from napari_omniseg.training.loop import TrainConfig, train
from napari_omniseg.training.losses import dice_bce_loss
from napari_omniseg.tissues import TISSUES


@pytest.fixture(autouse=True)
def _threads():
    # one thread: small convolutions gain nothing from more, and a busy machine
    # makes several threads wait on each other
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_forward_shapes(name):
    b = BASELINES[name]
    model = build_model(name, seed=0).eval()
    x = torch.rand(2, 3, 32, 48)
    with torch.no_grad():
        if name == "multi_network":
            assert model(x, 3).shape == (2, 2, 32, 48)
        else:
            assert model(x).shape == (2, 7, 32, 48)
        assert b.predict(model, x, 3).shape == (2, 32, 48) and b.predict(model, x, 3).dtype == torch.bool
        assert b.predict_all(model, x).shape == (2, 6, 32, 48)
        # the all-tissue masks agree with the per-tissue decision
        assert torch.equal(b.predict_all(model, x)[:, 4], b.predict(model, x, 4))


def test_parameter_counts():
    cfg = NetConfig()
    backbone = count_parameters(Backbone(cfg))
    single = count_parameters(BinaryUNet(cfg))
    assert single == backbone + 8 * 2 + 2
    assert count_parameters(build_model("multi_network")) == 6 * single
    assert count_parameters(build_model("multihead_tal")) == backbone + 8 * 7 + 7
    assert count_parameters(build_model("multiclass")) == backbone + 8 * 7 + 7
    # Omni-Seg: the same backbone + the controller (6,909,706 before the per-(tissue,
    # scale) head vector of 24 x 162 = 3,888 parameters was added)
    omni = count_parameters(OmniSegNet(cfg))
    assert omni == 6_913_594 == backbone + 6 * 4 * 162 * 256 + 162 + 6 * 4 * 162


def test_tal_loss_matches_hand_computation():
    # one image, 1 x 2 pixels, 3 classes: background, tissue 0, tissue 1; labelled for tissue 1
    probs = torch.tensor([[[[0.2, 0.1]], [[0.3, 0.6]], [[0.5, 0.3]]]])  # 1 x 3 x 1 x 2
    logits = probs.log()  # softmax(log p) = p
    target = torch.tensor([[[1.0, 0.0]]])
    # p_1 = 0.5 on the labelled pixel, 0.3 on the other; "not 1" = 0.2 + 0.3 and 0.1 + 0.6
    expected_bce = -(math.log(0.5) + math.log(0.7)) / 2
    assert float(tal_loss(logits, target, 1, dice=False)) == pytest.approx(expected_bce, rel=1e-6)
    # merged logit: sigmoid(z) = p_c
    assert torch.allclose(torch.sigmoid(merged_logit(logits, 1)), torch.tensor([[[0.5, 0.3]]]))
    # with Dice (smooth 1): fg Dice (2*0.5 + 1)/(0.8 + 1 + 1), bg Dice (2*0.7 + 1)/(1.2 + 1 + 1)
    dice_fg = (2 * 0.5 + 1) / (0.5 + 0.3 + 1 + 1)
    dice_bg = (2 * 0.7 + 1) / (0.5 + 0.7 + 1 + 1)
    expected = expected_bce + 1 - (dice_fg + dice_bg) / 2
    assert float(tal_loss(logits, target, 1)) == pytest.approx(expected, rel=1e-6)
    # ring weight enters like in dice_bce_loss
    w = torch.tensor([[[1.0, 1.2]]])
    expected_w = -(math.log(0.5) + 1.2 * math.log(0.7)) / 2
    assert float(tal_loss(logits, target, 1, w, dice=False)) == pytest.approx(expected_w, rel=1e-6)


def test_soft_dice_is_the_dice_half_of_dice_bce():
    torch.manual_seed(0)
    z = torch.randn(2, 8, 8)
    y = (torch.rand(2, 8, 8) > 0.5).float()
    w = 1 + 0.2 * (torch.rand(2, 8, 8) > 0.7).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(z, y, weight=w)
    assert torch.allclose(dice_bce_loss(torch.stack([-z, z], 1), y, w), bce + soft_dice_loss(torch.sigmoid(z), y, w))


def test_multiclass_target_unlabelled_is_background():
    mask = torch.tensor([[[True, False], [False, True]]])
    t = multiclass_target(mask, 3)
    assert t.tolist() == [[[4, 0], [0, 4]]]  # class 1 + tissue on the mask, 0 (background) elsewhere
    # hand check of the loss without Dice: CE of the target class
    logits = torch.zeros(1, 7, 2, 2)
    logits[0, 4, 0, 0] = 2.0
    loss = multiclass_loss(logits, mask.float(), 3)
    p = torch.softmax(logits, 1)
    ce = -(p[0, 4, 0, 0].log() + p[0, 0, 0, 1].log() + p[0, 0, 1, 0].log() + p[0, 4, 1, 1].log()) / 4
    dice = soft_dice_loss(p[:, 4], mask.float())
    assert float(loss) == pytest.approx(float(ce + dice), rel=1e-6)


#: the data stream the baselines share with Omni-Seg (benchmarks/compare_methods.py sets the same)
REFERENCE_STREAM = {"relations": False, "balanced": False, "object_crop": 0.0}


@pytest.fixture(scope="module")
def two_patches(demo_dir):
    """Two real glomerular-unit training patches, cut to their central 64 x 64 px."""
    s = load_arrays(select(load_dataset(demo_dir), "train", tissues=["glomerular_unit"])[:2])
    return [dataclasses.replace(p, image=p.image[96:160, 96:160].copy(), mask=p.mask[96:160, 96:160].copy()) for p in s]


@pytest.mark.parametrize("name", [*sorted(BASELINES), "omniseg"])
def test_two_epochs_decrease_the_loss(name, two_patches):
    cfg = TrainConfig(epochs=2, batch_size=2, crop=32, lr=3e-3, augment=False, seed=0, threads=1, **REFERENCE_STREAM)
    if name == "omniseg":
        _, hist = train(two_patches, [], None, cfg)
    else:
        model, hist = train_baseline(name, two_patches, [], cfg)
        rows, summ = evaluate_baseline(name, model, two_patches)
        assert len(rows) == 2 and 0.0 <= summ["mean_dice"] <= 1.0
    losses = [e["loss"] for e in hist["epochs"]]
    assert len(losses) == 2 and all(np.isfinite(losses)) and losses[1] < losses[0], losses


def test_same_seed_same_baseline(two_patches):
    cfg = TrainConfig(epochs=1, batch_size=2, crop=32, augment=True, seed=5, threads=1)
    a, _ = train_baseline("multihead_tal", two_patches, [], cfg)
    b, _ = train_baseline("multihead_tal", two_patches, [], cfg)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_baselines_see_the_same_pixels_as_omniseg(two_patches, monkeypatch):
    """Same seed -> the same batches, crops and augmentations as training.loop.train."""
    from napari_omniseg.training import baselines, loop

    seen: dict[str, list] = {"omniseg": [], "baseline": []}

    def recorder(key, fn):
        def wrapped(*args, **kw):
            out = fn(*args, **kw)
            seen[key].append(out[0].clone())
            return out
        return wrapped

    cfg = TrainConfig(epochs=2, batch_size=1, crop=32, augment=True, seed=3, threads=1, **REFERENCE_STREAM)
    monkeypatch.setattr(loop, "_batch_tensors", recorder("omniseg", loop._batch_tensors))
    train(two_patches, [], None, cfg)
    monkeypatch.setattr(baselines, "_batch_tensors", recorder("baseline", baselines._batch_tensors))
    train_baseline("multiclass", two_patches, [], cfg)
    assert len(seen["omniseg"]) == len(seen["baseline"]) == 4
    assert all(torch.equal(a, b) for a, b in zip(seen["omniseg"], seen["baseline"]))


def test_multi_network_selection_rule(two_patches):
    """By default each network is kept at its own tissue's best validation epoch; with
    ``per_tissue_selection=False`` (the comparison's common rule) the six networks are
    kept together at the epoch of best mean validation Dice, as Omni-Seg is."""
    cfg = TrainConfig(epochs=2, batch_size=2, crop=32, lr=3e-3, augment=False, seed=0, threads=1, val_every=1,
                      **REFERENCE_STREAM)
    _, own = train_baseline("multi_network", two_patches, two_patches, cfg)
    assert own["selection"] == "per tissue"
    assert set(own["best_epoch"]) == {t.name for t in TISSUES}
    model, common = train_baseline("multi_network", two_patches, two_patches, cfg, per_tissue_selection=False)
    assert common["selection"] == "mean" and set(common["best_epoch"]) == {"all"}
    best = max(common["epochs"], key=lambda e: e["val_mean_dice"])
    assert common["best_epoch"]["all"] == best["epoch"]
    # the kept networks are those of that epoch: their validation score is the recorded one
    _, summ = evaluate_baseline("multi_network", model, two_patches)
    assert summ["mean_dice"] == pytest.approx(best["val_mean_dice"], abs=1e-6)


@pytest.mark.parametrize("name", ["multi_network", "multihead_tal"])
def test_baseline_probability_matches_its_decision_and_calibrates(name, two_patches):
    """A baseline's probability cut at 0.5 is its own decision; calibrating picks from the
    same grid as Omni-Seg's calibration and never scores the calibration patches that show
    the tissue worse than the 0.5 cut does."""
    cfg = TrainConfig(epochs=1, batch_size=2, crop=32, lr=3e-3, augment=False, seed=0, threads=1, **REFERENCE_STREAM)
    model, _ = train_baseline(name, two_patches, [], cfg)
    b = BASELINES[name]
    x = torch.from_numpy(np.stack([s.image for s in two_patches])).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        assert torch.equal(b.probability(model, x, 2) > 0.5, b.predict(model, x, 2))
    from napari_omniseg.training.baselines import calibrate_baseline
    from napari_omniseg.training.calibrate import GRID

    # min_samples=1: on a bare clone one of the two central crops holds no unit, and a
    # crop annotated empty does not vote (training/calibrate.py)
    th = calibrate_baseline(name, model, two_patches, min_samples=1)
    assert set(th) == {"glomerular_unit"} and th["glomerular_unit"] in GRID
    # never worse than the 0.5 cut on the patches that voted (those showing the unit)
    shown = [p for p in two_patches if p.mask.any()]
    _, plain = evaluate_baseline(name, model, shown)
    _, cal = evaluate_baseline(name, model, shown, thresholds=th)
    assert cal["mean_dice"] >= plain["mean_dice"] - 0.005
    assert calibrate_baseline("multiclass", build_model("multiclass", seed=0), two_patches) == {}
