import shutil
import warnings

import imageio.v3 as iio
import numpy as np
import pytest

from napari_omniseg.training.augment import augment, random_crop
from napari_omniseg.training.data import DataError, load_arrays, load_dataset, load_folder, read_image, read_mask, select
from napari_omniseg.training.losses import dice_bce_loss, ring_weight
from napari_omniseg.training.manifest import MANIFEST_COLUMNS, append_manifest_rows, read_manifest_rows


def test_demo_split_and_layouts_agree(full_demo):
    via_csv = load_dataset(full_demo)
    via_folder = load_folder(full_demo / "KI_data_testingset_demo")
    assert len(via_csv) == len(via_folder) == 110
    assert {s.image_path for s in via_csv} == {s.image_path for s in via_folder}
    counts = {sp: len(select(via_csv, sp)) for sp in ("train", "val", "test")}
    assert counts == {"train": 68, "val": 19, "test": 23}
    assert len(select(via_csv, "train+val")) == 87
    ptc = select(via_csv, None, tissues=["ptc"])
    assert len(ptc) == 15 and {s.stain for s in ptc} == {"pas"}


def test_demo_arrays_are_rgb_uint8_and_binary_masks(demo_dir):
    s = load_arrays(select(load_dataset(demo_dir), "val"))
    assert all(x.image.shape == (256, 256, 3) and x.image.dtype == np.uint8 for x in s)
    assert all(x.mask.dtype == bool and x.mask.any() for x in s)


def _pair(tmp_path, img, msk, name="im_1"):
    d = tmp_path / "0_1_dt" / "he"
    d.mkdir(parents=True, exist_ok=True)
    iio.imwrite(d / f"{name}.png", img)
    iio.imwrite(d / f"{name}_mask_distal.png", msk)
    return d / f"{name}.png", d / f"{name}_mask_distal.png"


def test_encodings_are_normalised(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    grey = rgb[..., 0]
    rgba = np.dstack([rgb, np.full((32, 32), 255, np.uint8)])
    for i, img in enumerate([rgb, grey, rgba]):
        p, _ = _pair(tmp_path, img, (grey > 128).astype(np.uint8) * 255, f"im_{i}")
        out = read_image(p)
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert np.array_equal(read_image(tmp_path / "0_1_dt/he/im_2.png"), rgb)
    m01 = tmp_path / "m01.png"
    iio.imwrite(m01, (grey > 128).astype(np.uint8))  # 0/1 mask
    assert np.array_equal(read_mask(m01), grey > 128)


def test_bad_inputs_are_named(tmp_path):
    rgb = np.zeros((32, 32, 3), np.uint8)
    _pair(tmp_path, rgb, np.zeros((16, 32), np.uint8), "im_size")
    with pytest.raises(DataError, match=r"im_size_mask_distal.png: mask is 32x16 px but image im_size.png is 32x32"):
        load_arrays(load_folder(tmp_path))
    shutil.rmtree(tmp_path / "0_1_dt")
    _pair(tmp_path, rgb, np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) % 7, "im_multi")
    with pytest.raises(DataError, match="im_multi_mask_distal.png: mask is not binary"):
        load_arrays(load_folder(tmp_path))
    shutil.rmtree(tmp_path / "0_1_dt")
    p, m = _pair(tmp_path, rgb, np.zeros((32, 32), np.uint8), "im_empty")
    assert len(load_arrays(load_folder(tmp_path))) == 1  # empty masks are kept by default
    with pytest.warns(UserWarning, match="empty mask, sample skipped"):
        assert load_arrays(load_folder(tmp_path), drop_empty=True) == []
    p.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="im_empty.png: cannot read image"):
        load_arrays(load_folder(tmp_path))
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "nope")


def test_manifest_append_never_overwrites(tmp_path):
    m = tmp_path / "manifest.csv"
    row = {"image_path": "a.png", "label_path": "a_mask.png", "name": "a", "task_id": 0, "scale_id": 1, "tissue": "distal_tubule"}
    assert append_manifest_rows(m, [row]) == 1
    append_manifest_rows(m, [dict(row, image_path="b.png")])
    rows = read_manifest_rows(m)
    assert [r["image_path"] for r in rows] == ["a.png", "b.png"]
    assert list(rows[0]) == list(MANIFEST_COLUMNS)
    with pytest.raises(ValueError, match="unknown manifest columns"):
        append_manifest_rows(m, [{"bogus": 1}])
    assert len(read_manifest_rows(m)) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_manifest_folder_loads_as_dataset(tmp_path):
    rgb = np.zeros((32, 32, 3), np.uint8)
    msk = np.zeros((32, 32), np.uint8)
    msk[4:9, 4:9] = 255
    (tmp_path / "p").mkdir()
    iio.imwrite(tmp_path / "p/x.png", rgb)
    iio.imwrite(tmp_path / "p/x_mask.png", msk)
    append_manifest_rows(tmp_path / "manifest.csv", [{"image_path": "p/x.png", "label_path": "p/x_mask.png",
                                                      "tissue": "glomerular_tuft", "stain": "pas", "split": "train",
                                                      "origin": "correction"}])
    (s,) = load_arrays(load_dataset(tmp_path))
    assert s.tissue.short == "tuft" and s.origin == "correction" and s.split == "train" and s.mask.sum() == 25


def test_ring_weight_and_loss():
    m = np.zeros((9, 9), bool)
    m[4, 4] = True
    w = ring_weight(m)
    assert w[4, 4] == 1.0 and w[4, 6] == pytest.approx(1.2) and w[4, 7] == 1.0 and w[3, 3] == pytest.approx(1.2)
    import torch

    y = torch.from_numpy(m[None].astype(np.float32))
    good = torch.stack([torch.from_numpy(np.where(m, -20.0, 20.0)), torch.from_numpy(np.where(m, 20.0, -20.0))])[None]
    bad = -good
    assert float(dice_bce_loss(good, y, torch.from_numpy(w[None]))) < 0.05
    assert float(dice_bce_loss(bad, y, torch.from_numpy(w[None]))) > 1.5


def test_augment_is_seeded_and_keeps_mask_aligned():
    rng = np.random.default_rng
    img = np.zeros((64, 64, 3), np.float32)
    img[20:40, 10:30] = 1.0
    msk = img[..., 0] > 0.5
    a1, m1 = augment(img, msk, rng(5))
    a2, m2 = augment(img, msk, rng(5))
    assert np.array_equal(a1, a2) and np.array_equal(m1, m2)
    for seed in range(10):
        a, m = augment(img, msk, rng(seed))
        assert a.shape == img.shape and m.dtype == bool and a.min() >= 0 and a.max() <= 1
        if m.sum() > 50:  # mask still sits on the bright square
            assert a[..., 0][m].mean() > a[..., 0][~m].mean() + 0.3
    c, cm = random_crop(img, msk, 32, rng(0))
    assert c.shape == (32, 32, 3) and cm.shape == (32, 32)


def test_zoom_shrinks_and_grows_the_object_with_its_mask_and_is_off_by_default():
    from napari_omniseg.training.augment import AugmentConfig, _zoom

    img = np.zeros((128, 128, 3), np.float32)
    img[44:84, 44:84] = 1.0  # a 40 px bright square in the middle
    msk = img[..., 0] > 0.5
    for z, side in [(0.5, 20), (1.25, 50)]:
        a, m = _zoom(img, msk, z)
        ys, xs = np.nonzero(m[32:96, 32:96])  # the centre copy (the border is mirrored)
        assert abs((ys.max() - ys.min() + 1) - side) <= 2 and abs((xs.max() - xs.min() + 1) - side) <= 2
        assert a[..., 0][m].mean() > 0.9 and a[..., 0][~m].mean() < 0.1  # image and mask moved together
    # p_zoom = 0 (the default) draws nothing more: the seeded stream is the one it was
    rng = np.random.default_rng
    a1, m1 = augment(img, msk, rng(3))
    a2, m2 = augment(img, msk, rng(3), AugmentConfig(p_zoom=0.0, zoom=(0.1, 0.2)))
    assert np.array_equal(a1, a2) and np.array_equal(m1, m2)
    # p_zoom = 1 with a fixed factor shrinks every object by about that much in area
    areas = [augment(img, msk, rng(s), AugmentConfig(p_geometric=0, p_zoom=1.0, zoom=(0.5, 0.5)))[1][32:96, 32:96].sum()
             for s in range(4)]
    assert all(abs(x - 400) < 80 for x in areas), areas


def test_defocus_softens_the_image_keeps_the_mask_and_is_off_by_default():
    from napari_omniseg.training.augment import AugmentConfig, _defocus

    rng = np.random.default_rng
    img = np.zeros((96, 96, 3), np.float32)
    img[::4] = 1.0  # stripes 1 px wide: all high frequency
    img[30:60, 30:60] = 0.5
    msk = np.zeros((96, 96), bool)
    msk[30:60, 30:60] = True

    def edge_energy(a):  # both axes: augment() may turn the stripes by 90 degrees
        return float(np.abs(np.diff(a, axis=0)).mean() + np.abs(np.diff(a, axis=1)).mean())

    cfg = AugmentConfig(p_defocus=1.0)
    for s in range(6):  # both kinds (blur, shrink and enlarge back) are drawn over these seeds
        a = _defocus(img, rng(s), cfg)
        assert a.shape == img.shape and a.dtype == np.float32
        assert edge_energy(a) < 0.6 * edge_energy(img)  # the stripes are softened
        assert abs(float(a.mean()) - float(img.mean())) < 0.02  # the same content, not darker or lighter
    # through augment(): the mask is untouched by defocus (geometry off, colour and noise off)
    only = AugmentConfig(p_geometric=0, p_color=0, p_noise=0, p_defocus=1.0)
    a, m = augment(img, msk, rng(7), only)
    assert m.sum() == msk.sum() and edge_energy(a) < 0.6 * edge_energy(img)
    # p_defocus = 0 (the default) draws nothing more: the seeded stream is the one it was
    a1, m1 = augment(img, msk, rng(3))
    a2, m2 = augment(img, msk, rng(3), AugmentConfig(p_defocus=0.0, defocus_sigma=(5, 6)))
    assert np.array_equal(a1, a2) and np.array_equal(m1, m2)


def test_colour_transfer_moves_real_patches_to_other_slides_colours_and_leaves_glass(demo_dir):
    """Real demo patches of two stains: a PAS patch recoloured with statistics drawn
    around the silver patches' own lands near them in CIELAB; glass stays glass."""
    from skimage.color import rgb2lab

    from napari_omniseg.training.augment import AugmentConfig, _lab_transfer, _tissue_lab, lab_statistics

    rng = np.random.default_rng
    s = load_arrays(select(load_dataset(demo_dir), ["train", "val", "test"]))
    pas = [x.image for x in s if x.stain == "pas"]
    sil = [x.image for x in s if x.stain == "sil"]
    assert pas and sil
    st_sil = lab_statistics(sil)
    assert len(st_sil) == 12 and all(np.isfinite(st_sil)) and min(st_sil[3:6]) > 0
    # a patch with glass: a white block pasted into a PAS patch
    img = pas[0].astype(np.float32) / 255.0
    img[:40, :40] = 0.97
    lab0, t0 = _tissue_lab(img)
    assert not t0[:40, :40].any()
    # drawn with zero spread over images, the target is exactly the silver mean: the
    # tissue pixels' CIELAB mean moves there from far away
    exact = tuple(st_sil[:6]) + (0.0,) * 6
    out = _lab_transfer(img, rng(0), exact)
    assert out.shape == img.shape and out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1
    before = lab0[t0].mean(0)
    after = rgb2lab(out)[t0].mean(0)
    target = np.array(st_sil[:3])
    assert np.linalg.norm(after - target) < 0.35 * np.linalg.norm(before - target), (before, after, target)
    assert np.allclose(out[:40, :40], img[:40, :40], atol=0.01)  # glass untouched
    # seeded: the same generator state gives the same colours; different draws differ
    st_all = lab_statistics(pas + sil)
    a = _lab_transfer(img, rng(1), st_all)
    assert np.array_equal(a, _lab_transfer(img, rng(1), st_all)) and not np.array_equal(a, _lab_transfer(img, rng(2), st_all))
    # off by default (p = 0 or no statistics): augment() draws nothing more
    msk = s[0].mask
    base = augment(img, msk, rng(3))
    for cfg in (AugmentConfig(p_lab_transfer=0.0, lab_stats=st_all), AugmentConfig(p_lab_transfer=1.0)):
        o = augment(img, msk, rng(3), cfg)
        assert np.array_equal(base[0], o[0]) and np.array_equal(base[1], o[1])
    on = augment(img, msk, rng(3), AugmentConfig(p_lab_transfer=1.0, lab_stats=st_all))
    assert not np.array_equal(base[0], on[0])


def test_two_processes_appending_to_one_manifest_keep_every_row(tmp_path):
    """Real concurrent processes: 2 x 100 appends, none lost."""
    import subprocess
    import sys

    from napari_omniseg.training.manifest import read_manifest_rows

    man = tmp_path / "manifest.csv"
    code = ("import sys\nfrom napari_omniseg.training.manifest import append_manifest_rows\n"
            "for i in range(100):\n"
            "    append_manifest_rows(sys.argv[1], [{'image_path': f'{sys.argv[2]}-{i}.png', 'label_path': 'm.png'}])\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(man), tag]) for tag in ("a", "b")]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    rows = read_manifest_rows(man)
    assert len(rows) == 200 and len({r["image_path"] for r in rows}) == 200
