"""The inference engine on real kidney pixels: region == whole slide, one backbone
pass per tile per magnification, background skipped, corrupt tiles marked unknown,
a killed run resumes to the same result, and the OME-Zarr output is valid."""

import numpy as np
import pytest
import torch
import zarr

from napari_omniseg.inference.engine import (
    UNKNOWN,
    CorruptTileWarning,
    EngineConfig,
    SegmentationCancelled,
    Segmenter,
    segment_region,
)
from napari_omniseg.inference.plan import make_plans, ramp_window
from napari_omniseg.inference.run import segment_to_store
from napari_omniseg.labels.store import MAP_NAME, LabelStore
from napari_omniseg.model import new_checkpoint
from napari_omniseg.slides import ImageSlide
from napari_omniseg.training.data import load_arrays, load_dataset, select

CFG = dict(core=64, margin=16, batch_size=3)


@pytest.fixture(scope="module")
def slide_image(demo_dir):
    """A 20x-like mosaic (0.5 um/px) of real 10x demo patches with a white margin."""
    s = load_arrays([x for x in select(load_dataset(demo_dir), "test") if x.tissue.magnification == 10][:4])
    img = np.full((300, 420, 3), 245, np.uint8)
    for k, x in enumerate(s):
        y0, x0 = 20 + (k // 2) * 130, 20 + (k % 2) * 200
        img[y0 : y0 + 128, x0 : x0 + 180] = x.image[:128, :180]
    return img


@pytest.fixture(scope="module")
def ckpt():
    # the reference controller (raw pooled vector) with a large image term gives random heads
    # whose output varies over the slide, which the comparisons below need
    from napari_omniseg.model.network import NetConfig
    from napari_omniseg.tissues import TISSUES

    cfg = NetConfig(tissue_scales=tuple(t.scale_id for t in TISSUES), pool_norm="none", controller_init="uniform")
    ck = new_checkpoint(cfg=cfg, seed=0)
    with torch.no_grad():  # decisive heads: probabilities far from 0.5
        ck.model.controller_weight.normal_(0, 0.5)
    return ck


def test_ramp_windows_sum_to_one_in_overlaps():
    w = ramp_window(16, 4)
    row = w[12]  # a row outside the ramps: the 1-D profile
    assert row.max() == 1.0 and row[0] == pytest.approx(1 / 16)
    s = 16 + 2 * 4
    total = np.zeros(3 * 16 + 2 * 4)
    for i in range(3):
        total[i * 16 : i * 16 + s] += row
    assert np.allclose(total[8:-8], 1.0)


def test_plans_group_by_magnification_and_check_region():
    from napari_omniseg.tissues import TISSUES

    plans = make_plans(TISSUES, (1000, 2000), 0.25, core=128, margin=16)
    assert [p.magnification for p in plans] == [5, 10, 40]
    assert [len(p.tissues) for p in plans] == [2, 3, 1]
    assert plans[1].shape == (250, 500) and plans[1].factor == 4.0
    with pytest.raises(ValueError, match="outside the slide"):
        make_plans(TISSUES, (1000, 2000), 0.25, region=(1900, 0, 200, 10))


def test_region_equals_whole_slide_and_backbone_runs_once_per_tile(slide_image, ckpt):
    src = ImageSlide(slide_image, mpp=0.5)
    seg = Segmenter(ckpt, EngineConfig(**{**CFG, "batch_size": 1}, skip_background=False))
    calls = {"features": 0}
    orig = seg.model.features

    def counting(x):
        calls["features"] += x.shape[0]
        return orig(x)

    seg.model.features = counting
    tissues = ["distal_tubule", "proximal_tubule", "artery", "glomerular_unit"]
    whole, rep = segment_region(seg, src, None, tissues)
    # one backbone pass per tile per magnification (10x and 5x), never per tissue
    plans = seg.plans(src, tissues)
    n_tiles = sum(len(p.tiles) for p in plans)
    assert rep.tiles_run == n_tiles and calls["features"] == n_tiles  # one tile per call: nothing padded
    assert whole["distal_tubule"].data.shape == (150, 210)  # 0.5 -> 1.0 um/px
    assert whole["glomerular_unit"].data.shape == (75, 105)
    for name in tissues:
        v = np.unique(whole[name].data)
        assert set(v) <= {0, 1} and len(v) == 2, (name, v)
    region = (90, 50, 200, 180)  # level-0 x, y, w, h
    part, _ = segment_region(seg, src, region, tissues)
    for name in tissues:
        r = part[name]
        y0, x0 = r.origin
        h, w = r.data.shape
        np.testing.assert_array_equal(r.data, whole[name].data[y0 : y0 + h, x0 : x0 + w], err_msg=name)
    assert part["distal_tubule"].origin == (25, 45)
    scale, translate = part["distal_tubule"].napari_transform()
    assert scale == (2.0, 2.0) and translate == (50.5, 90.5)


def test_background_tiles_are_skipped(slide_image, ckpt):
    img = np.full((400, 400, 3), 255, np.uint8)
    img[:160, :160] = slide_image[20:180, 20:180]
    src = ImageSlide(img, mpp=1.0)
    seg = Segmenter(ckpt, EngineConfig(**CFG))
    res, rep = segment_region(seg, src, None, ["distal_tubule"])
    assert rep.tiles_skipped > 0 and rep.tiles_run < rep.tiles_total
    assert not res["distal_tubule"].data[300:, 300:].any()


class _Corrupt(ImageSlide):
    """Raises for reads that touch one level-0 area, like a broken JPEG tile."""

    bad = (100, 100)

    def read_at_mpp(self, target_mpp, y0, x0, h, w):
        f = target_mpp / self.mpp
        if y0 <= self.bad[0] < y0 + h * f and x0 <= self.bad[1] < x0 + w * f:
            raise OSError("JPEG decode error: corrupt tile data")
        return super().read_at_mpp(target_mpp, y0, x0, h, w)


def test_corrupt_tile_is_reported_and_marked_unknown(slide_image, ckpt):
    seg = Segmenter(ckpt, EngineConfig(**CFG, skip_background=False))
    clean, _ = segment_region(seg, ImageSlide(slide_image, mpp=1.0), None, ["distal_tubule"])
    with pytest.warns(CorruptTileWarning, match="could be read only in part"):
        bad, rep = segment_region(seg, _Corrupt(slide_image, mpp=1.0), None, ["distal_tubule"])
    assert len(rep.tiles_failed) >= 1 and "read in part" in rep.tiles_failed[0][3]
    a, b = clean["distal_tubule"].data, bad["distal_tubule"].data
    assert b[100, 100] == UNKNOWN
    unknown = b == UNKNOWN
    # the failed tile is re-read piece by piece: only the 32 px piece holding the broken
    # spot is lost, not the whole 64 px block
    assert unknown.sum() == 32 * 32 and unknown[96:128, 96:128].all()
    # the rest of the broken tile's block is segmented (not unknown, not all background)
    assert (b[64:128, 64:128] != UNKNOWN).sum() == 64 * 64 - 32 * 32
    # pixels no part-read tile covers are bit-identical to the clean run; the part-read
    # tile only fills in where no fully read tile reaches (its block and overlap band)
    changed = (a != b) & ~unknown
    assert not changed[:, 160:].any() and not changed[160:].any() and not changed[:40].any()


def test_a_tile_with_no_readable_piece_marks_its_block_unknown(slide_image, ckpt):
    class _Hole(ImageSlide):  # every read that touches level-0 [40:200, 40:200] fails
        def read_at_mpp(self, target_mpp, y0, x0, h, w):
            f = target_mpp / self.mpp
            if y0 < 200 and y0 + h * f > 40 and x0 < 200 and x0 + w * f > 40:
                raise OSError("truncated strip")
            return super().read_at_mpp(target_mpp, y0, x0, h, w)

    seg = Segmenter(ckpt, EngineConfig(**CFG, skip_background=False))
    with pytest.warns(CorruptTileWarning):
        res, rep = segment_region(seg, _Hole(slide_image, mpp=1.0), None, ["distal_tubule"])
    b = res["distal_tubule"].data
    assert (b[64:128, 64:128] == UNKNOWN).all()  # tile (1, 1) lies wholly in the hole
    assert (b[40:200, 40:200] == UNKNOWN).all() and (b != UNKNOWN).sum() > 0.5 * b.size
    assert not (b[:32] == UNKNOWN).any() and not (b[:, 224:] == UNKNOWN).any()


def test_store_is_valid_ome_zarr_and_a_killed_run_resumes(slide_image, ckpt, tmp_path):
    src = ImageSlide(slide_image, mpp=0.5)
    seg = Segmenter(ckpt, EngineConfig(**CFG, skip_background=False))
    tissues = ["glomerular_unit", "glomerular_tuft", "distal_tubule"]
    ref, _ = segment_to_store(seg, src, tmp_path / "ref.ome.zarr", tissues)
    n = {"k": 0}

    def stop():
        n["k"] += 1
        return n["k"] > 3

    with pytest.raises(SegmentationCancelled):
        segment_to_store(seg, src, tmp_path / "cut.ome.zarr", tissues, should_stop=stop)
    cut = LabelStore(tmp_path / "cut.ome.zarr")
    assert not cut.complete  # valid, readable, marked incomplete
    assert "INCOMPLETE" in cut.describe()
    done, rep = segment_to_store(seg, src, tmp_path / "cut.ome.zarr", tissues)
    assert rep.blocks_resumed > 0 and done.complete
    for name in tissues + [MAP_NAME]:
        np.testing.assert_array_equal(ref.read(name), done.read(name), err_msg=name)
    # NGFF structure, readable with plain zarr
    root = zarr.open_group(str(tmp_path / "ref.ome.zarr"), mode="r")
    assert root.attrs["ome"]["version"] == "0.5"
    assert root["labels"].attrs["ome"]["labels"] == tissues_sorted(tissues) + [MAP_NAME]
    ms = root["labels/distal_tubule"].attrs["ome"]["multiscales"][0]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 1.0]
    assert root["labels/distal_tubule/0"].shape == (150, 210)
    assert root["labels/distal_tubule/1"].shape == (75, 105)
    colors = root["labels/glomerular_tuft"].attrs["ome"]["image-label"]["colors"]
    assert colors[0]["rgba"][:3] == [0xD6, 0x27, 0x28]
    # complete map: tuft drawn inside the glomerular unit
    tmap = ref.read(MAP_NAME)
    assert tmap.shape == (150, 210)  # the finest magnification among the tissues (10x)
    tuft = ref.read("glomerular_tuft")
    up = np.kron(tuft, np.ones((2, 2), np.uint8))[:150, :210]
    assert np.all(tmap[up == 1] == 4)
    with pytest.raises(FileExistsError, match="different segmentation"):
        segment_to_store(seg, src, tmp_path / "ref.ome.zarr", ["artery"])


def tissues_sorted(names):
    from napari_omniseg.tissues import resolve_tissues

    return [t.name for t in resolve_tissues(names)]


def test_corrupt_tile_in_the_tissue_mask_and_the_estimate_sample_is_not_fatal(slide_image, ckpt):
    """The tissue mask reads a low-resolution copy of the slide and the estimate reads a
    few sample tiles: a broken tile in either is skipped and reported, the run goes on."""
    from napari_omniseg.inference.run import estimate

    class _Everywhere(_Corrupt):
        bad = (150, 210)  # in the middle: every pass over the slide touches it

    seg = Segmenter(ckpt, EngineConfig(**CFG, skip_background=True))
    src = _Everywhere(slide_image, mpp=1.0)
    est = estimate(seg, src, ["distal_tubule"])  # the mask and the sample both read the broken spot
    assert est["tiles"] > 0 and est["seconds"] > 0
    with pytest.warns(CorruptTileWarning):
        res, rep = segment_region(seg, src, None, ["distal_tubule"])
    assert len(rep.tiles_failed) >= 1 and rep.tiles_run > 0
    assert res["distal_tubule"].data[150, 210] == UNKNOWN


def test_a_small_region_of_a_huge_single_level_slide_costs_the_region(slide_image, ckpt, tmp_path, monkeypatch):
    """A 512 px region of a 20,000 x 20,000 px slide with no pyramid: the tissue mask and
    the finishing of the store touch the region and its halo, not the slide."""
    import zarr as _zarr

    big = np.broadcast_to(np.array([245, 245, 245], np.uint8), (20000, 20000, 3))  # no memory: one pixel, repeated

    class _Lazy(ImageSlide):
        read_px = 0

        def _read(self, level, y0, y1, x0, x1):
            _Lazy.read_px += (y1 - y0) * (x1 - x0)
            return np.array(self._img[y0:y1, x0:x1])

    src = _Lazy(np.zeros((8, 8, 3), np.uint8), mpp=0.5)
    src._img, src.shapes = big, [(20000, 20000)]  # (the constructor would copy the view)
    region = (4000, 6000, 512, 512)
    seg = Segmenter(ckpt, EngineConfig(core=256, margin=16, batch_size=2, skip_background=True))
    writes = [0]
    real = _zarr.Array.__setitem__

    def counting(self, key, value):
        writes[0] += 1
        return real(self, key, value)

    monkeypatch.setattr(_zarr.Array, "__setitem__", counting)
    store, rep = segment_to_store(seg, src, tmp_path / "big.ome.zarr", ["distal_tubule"], region)
    assert store.complete and store.level("distal_tubule", 0).shape == (10000, 10000)
    assert _Lazy.read_px < 20e6, _Lazy.read_px  # region, halo and tiles: ~8e6 px; the whole-slide mask alone reads 4e8
    assert writes[0] < 200, writes[0]  # a whole-slide finish writes thousands of chunks here


def test_labels_on_glass_are_background_also_inside_tiles_with_tissue(slide_image, ckpt):
    """A tile holding tissue is run whole; what the heads say about its glass (white
    pixels outside the tissue mask grown by one mask pixel) is cleared; a pixel that
    is not white keeps its label even where the coarse mask missed pale tissue."""
    import dataclasses

    img = np.full((512, 512, 3), 246, np.uint8)
    img[:, :200] = slide_image[:, :200][np.arange(512) % slide_image.shape[0]]  # tissue on the left, glass right
    src = ImageSlide(img, mpp=1.0)
    ck = dataclasses.replace(ckpt, thresholds={"distal_tubule": 0.01})  # the head marks nearly everything
    cfg = dict(core=512, margin=16, batch_size=2, skip_background=True)  # one tile: tissue and glass
    on, _ = segment_region(Segmenter(ck, EngineConfig(**cfg)), src, None, ["distal_tubule"])
    off, _ = segment_region(Segmenter(ck, EngineConfig(**cfg, clear_glass=False)), src, None, ["distal_tubule"])
    a, b = on["distal_tubule"].data, off["distal_tubule"].data
    assert (b[:, 300:] == 1).mean() > 0.9  # without the rule the head covers the glass
    assert not a[:, 300:].any()  # with it the glass is background
    # tissue keeps its labels: every stained pixel labelled without the rule still is
    stained = img.min(axis=-1) <= 240
    assert stained[:, :200].mean() > 0.5
    np.testing.assert_array_equal(a[stained], b[stained])


def test_parallel_reads_and_a_writer_thread_give_the_same_store_and_resume(slide_image, ckpt, tmp_path):
    """Several reader threads and a writer thread change when work happens, never what is
    written: the store is bit-identical to the plain run, also after a cancelled run with
    the writer thread is resumed; blocks finished before the cancel are kept."""
    src = ImageSlide(slide_image, mpp=0.5)
    tissues = ["glomerular_unit", "glomerular_tuft", "distal_tubule", "proximal_tubule"]
    plain = Segmenter(ckpt, EngineConfig(**CFG, skip_background=False, readers=1, writers=0))
    busy = Segmenter(ckpt, EngineConfig(**CFG, skip_background=False, readers=3, writers=1))
    assert (plain.readers, plain.threaded_writes, busy.readers, busy.threaded_writes) == (1, False, 3, True)
    ref, rep_ref = segment_to_store(plain, src, tmp_path / "ref.ome.zarr", tissues)
    out, rep = segment_to_store(busy, src, tmp_path / "busy.ome.zarr", tissues)
    assert rep.tiles_run == rep_ref.tiles_run and rep.blocks_written == rep_ref.blocks_written > 0
    for name in tissues + [MAP_NAME]:
        np.testing.assert_array_equal(ref.read(name), out.read(name), err_msg=name)
    n = {"k": 0}

    def stop():
        n["k"] += 1
        return n["k"] > 4

    with pytest.raises(SegmentationCancelled):
        segment_to_store(busy, src, tmp_path / "cut.ome.zarr", tissues, should_stop=stop)
    done, rep2 = segment_to_store(busy, src, tmp_path / "cut.ome.zarr", tissues)
    assert rep2.blocks_resumed > 0 and done.complete
    for name in tissues + [MAP_NAME]:
        np.testing.assert_array_equal(ref.read(name), done.read(name), err_msg=name)


def test_a_failing_write_in_the_writer_thread_ends_the_run_with_its_error(slide_image, ckpt):
    from napari_omniseg.inference.engine import MemorySink

    class Full(MemorySink):
        def write_block(self, plan, bi, bj, labels):
            if (bi, bj) == (1, 1):
                raise OSError(28, "No space left on device")
            super().write_block(plan, bi, bj, labels)

    src = ImageSlide(slide_image, mpp=0.5)
    seg = Segmenter(ckpt, EngineConfig(**CFG, skip_background=False, readers=2, writers=1))
    with pytest.raises(OSError, match="No space left"):
        seg.run(src, Full((0, 0, 420, 300)), ["distal_tubule"])
    with pytest.raises(ValueError, match="readers"):
        Segmenter(ckpt, EngineConfig(readers=-1))


def test_tissue_mask_cache_never_hands_one_image_anothers_mask():
    """Images segmented one after another with one Segmenter: once an image is freed,
    Python may give the next one its id(); the cached tissue mask (which decides the
    tiles run, the glass cleared and the statistics) must still be the new image's."""
    from napari_omniseg.inference.engine import EngineConfig, Segmenter
    from napari_omniseg.model import load_checkpoint
    from napari_omniseg.model.registry import shipped_checkpoint
    from napari_omniseg.demo import bundled_samples
    from napari_omniseg.slides import ImageSlide

    s = next(p for p in bundled_samples() if p.tissue.name == "proximal_tubule")
    glass = np.full((256, 512, 3), 243, np.uint8)
    left, right = glass.copy(), glass.copy()
    left[:, :256] = s.image[..., :3]
    right[:, 256:] = s.image[..., :3]
    seg = Segmenter(load_checkpoint(shipped_checkpoint()), EngineConfig(device="cpu"))
    a, b = ImageSlide(left, mpp=s.tissue.mpp), ImageSlide(right, mpp=s.tissue.mpp)
    ma = seg.tissue_mask(a)[0]
    assert ma[:, : ma.shape[1] // 2].mean() > 0.8 and not ma[:, -ma.shape[1] // 4 :].any()
    # as if ``b`` had been given ``a``'s id after ``a`` was freed
    (key, entry), = seg._mask_cache.items()
    seg._mask_cache[(id(b), *key[1:])] = entry
    mb = seg.tissue_mask(b)[0]
    assert mb[:, -mb.shape[1] // 2 :].mean() > 0.8 and not mb[:, : mb.shape[1] // 4].any()
    assert seg.tissue_mask(b)[0] is mb  # and b's own mask is cached
