"""Corrections core (Qt-free): sessions, autosave and crash recovery, commit, export, fine-tune."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from napari_omniseg.corrections import (
    CorrectionSession,
    SessionError,
    SlideInfo,
    UncommittedEditsError,
    default_project_dir,
    export_corrections,
    patch_grid,
    slide_stem,
    write_region_to_store,
)
from napari_omniseg.tissues import get_tissue
from napari_omniseg.training.manifest import read_manifest_rows

DT = get_tissue("distal_tubule")
PT = get_tissue("proximal_tubule")
CAP = get_tissue("glomerular_unit")


def _slide(mpp=0.5, shape=(1200, 1600)):
    return SlideInfo("slideA.svs", shape, mpp, "/data/slideA.svs")


def _pred(shape, seed=0):
    rng = np.random.default_rng(seed)
    a = (rng.random(shape) > 0.7).astype(np.uint8)
    return a


def _session(tmp_path, **kw):
    return CorrectionSession.open(tmp_path / "proj.omniseg", _slide(), **kw)


def test_slide_stem_and_default_project_dir(tmp_path):
    assert slide_stem("/x/a.ome.tif") == "a"
    assert slide_stem("b.svs") == "b"
    assert slide_stem("c.ome.zarr") == "c"
    p = tmp_path / "s1.svs"
    p.write_bytes(b"x")
    # never beside the slide (a shared slide store must not fill with project folders)
    d = default_project_dir(p)
    assert d.parent.name == "projects" and d.name.startswith("s1-") and d.suffix == ".omniseg"
    assert not (tmp_path / "s1.omniseg").exists()
    # two slides with one name get two projects
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "s1.svs").write_bytes(b"x")
    assert default_project_dir(tmp_path / "b" / "s1.svs") != d
    # an in-memory image goes under OMNISEG_HOME too
    d = default_project_dir(None, name="my image")
    assert d.name == "my_image.omniseg" and "projects" in d.parts
    # a project that an earlier version made beside the slide is still found
    beside = CorrectionSession.open(tmp_path / "s1.omniseg", _slide())
    assert default_project_dir(p) == beside.folder


def test_autosave_is_debounced_and_survives_a_crash(tmp_path):
    s = _session(tmp_path, autosave_interval=2.0)
    wr = s.set_region(DT, _pred((100, 120)), (10, 20), 2.0, 1.0, (40, 20, 240, 200), "m@1234")
    assert s.poll() == []  # nothing changed
    t0 = wr.last_save
    wr.data[5:9, 5:9] = 1  # a brush stroke (napari writes into the same array)
    assert s.pending() == ["distal_tubule"]
    assert s.poll(now=t0 + 0.5) == []  # too soon after the last save
    assert s.poll(now=t0 + 2.1) == ["distal_tubule"]
    assert s.pending() == []
    wr.data[50:60, 50:60] = 0
    s.set_reviewed(DT, True)
    assert s.poll(now=wr.last_save + 2.5) == ["distal_tubule"]
    expected = wr.data.copy()
    del s, wr  # "crash": nothing is closed or flushed
    s2 = CorrectionSession.open(tmp_path / "proj.omniseg", _slide())
    r = s2.regions["distal_tubule"]
    np.testing.assert_array_equal(r.data, expected)
    assert r.origin == (10, 20) and r.factor == 2.0 and r.reviewed and r.model_version == "m@1234"
    assert r.has_uncommitted_edits()  # still not committed after the crash
    assert s2.edited_pixels(DT) > 0


def test_work_file_newer_than_state_is_used(tmp_path):
    """A crash between writing the array and session.json keeps the newer array."""
    s = _session(tmp_path)
    wr = s.set_region(DT, _pred((40, 40)), (0, 0), 2.0, 1.0, (0, 0, 80, 80))
    state = (s.folder / "session.json").read_bytes()
    wr.data[:] = 1
    s.save()
    (s.folder / "session.json").write_bytes(state)  # as if the rename of the state never happened
    s2 = CorrectionSession.open(s.folder, _slide())
    assert (s2.regions["distal_tubule"].data == 1).all()


def test_no_edit_escapes_detection(tmp_path):
    """An erase and a paint 65,521 bytes apart leave adler32 unchanged; the edit must
    still be seen (saved, and counted as an uncommitted edit)."""
    import zlib

    pred = np.zeros((300, 300), np.uint8)
    pred.flat[100] = 1
    s = _session(tmp_path)
    wr = s.set_region(DT, pred, (0, 0), 2.0, 1.0, (0, 0, 600, 600))
    before = zlib.adler32(wr.data.data)
    wr.data.flat[100] = 0  # erase
    wr.data.flat[100 + 65521] = 1  # paint
    assert zlib.adler32(wr.data.data) == before  # the case is real
    assert s.pending() == ["distal_tubule"] and wr.has_uncommitted_edits()
    assert s.save() == ["distal_tubule"]
    s2 = CorrectionSession.open(s.folder, _slide())
    assert s2.regions["distal_tubule"].data.flat[100 + 65521] == 1
    assert s2.regions["distal_tubule"].has_uncommitted_edits()


def test_project_of_an_earlier_version_keeps_its_edit_state(tmp_path):
    """session.json of earlier versions stored adler32 ints as checksums."""
    import zlib

    s = _session(tmp_path)
    s.set_region(DT, _pred((40, 40)), (0, 0), 2.0, 1.0, (0, 0, 80, 80))
    s.set_region(get_tissue("proximal_tubule"), _pred((40, 40), seed=1), (0, 0), 2.0, 1.0, (0, 0, 80, 80))
    s.regions["proximal_tubule"].data[:5] = 1
    s.save()
    st = json.loads((s.folder / "session.json").read_text())
    for name, r in st["regions"].items():
        base = _pred((40, 40), seed=0 if name == "distal_tubule" else 1)
        r["baseline_checksum"] = zlib.adler32(base.data) & 0xFFFFFFFF
        r["saved_checksum"] = 0
    (s.folder / "session.json").write_text(json.dumps(st))
    s2 = CorrectionSession.open(s.folder, _slide())
    assert not s2.regions["distal_tubule"].has_uncommitted_edits()
    assert s2.regions["proximal_tubule"].has_uncommitted_edits()


def test_project_of_another_image_is_refused(tmp_path):
    _session(tmp_path)
    with pytest.raises(SessionError, match="belongs to another image"):
        CorrectionSession.open(tmp_path / "proj.omniseg", _slide(shape=(10, 10)))
    with pytest.raises(SessionError, match="no correction project"):
        CorrectionSession.open(tmp_path / "nothing")


def test_uncommitted_edits_block_a_new_region_until_commit_or_discard(tmp_path):
    s = _session(tmp_path)
    pred = _pred((50, 50))
    wr = s.set_region(DT, pred.copy(), (0, 0), 2.0, 1.0, (0, 0, 100, 100))
    wr.data[0:10, 0:10] = 1 - wr.data[0:10, 0:10]
    with pytest.raises(UncommittedEditsError, match="not committed"):
        s.set_region(DT, pred, (5, 5), 2.0, 1.0, (10, 10, 100, 100))
    s.discard(DT)
    np.testing.assert_array_equal(wr.data, pred)
    assert not wr.has_uncommitted_edits()
    wr.data[0:3, 0:3] = 1 - wr.data[0:3, 0:3]
    s.set_reviewed(DT)
    (rec,) = s.commit()
    assert rec.reviewed and rec.tissue == "distal_tubule" and not rec.store_written
    np.testing.assert_array_equal(s.load_commit(rec), wr.data)
    assert not wr.has_uncommitted_edits()
    s.set_region(DT, pred, (5, 5), 2.0, 1.0, (10, 10, 100, 100))  # allowed now


def test_commit_only_reviewed_and_supersede(tmp_path):
    s = _session(tmp_path)
    s.set_region(DT, _pred((30, 30)), (0, 0), 2.0, 1.0, (0, 0, 60, 60))
    s.set_region(PT, _pred((30, 30), 1), (0, 0), 2.0, 1.0, (0, 0, 60, 60))
    assert s.commit() == []  # nothing reviewed
    s.set_reviewed(PT)
    (r1,) = s.commit()
    assert r1.tissue == "proximal_tubule"
    s.regions["proximal_tubule"].data[0, 0] ^= 1
    (r2,) = s.commit()
    assert r2.id == r1.id + 1
    assert s.commit() == []  # nothing new: the reviewed region is committed already
    ex = s.exportable()
    assert [c.id for c in ex] == [r2.id]  # the older commit of the same region is superseded
    st = json.loads((s.folder / "session.json").read_text())
    assert [c["superseded"] for c in st["commits"]] == [True, False]


@pytest.mark.parametrize("crash_at", ["commit-file", "store", "state"])
def test_a_crash_at_every_commit_write_leaves_a_state_the_next_start_repairs(tmp_path, monkeypatch, crash_at):
    """Inject a crash at each write of Commit (the commit file, the label store, the
    session record), reopen as after a restart: the edit is still there, still to commit,
    and the next Commit succeeds and is recorded."""
    from napari_omniseg.corrections import session as sess

    tissues = [DT, PT]
    st = _store(tmp_path, tissues)
    s = _session(tmp_path)
    s.store_path = str(st.path)
    data = np.array(st.level(DT.name, 0)[0:40, 0:40])
    wr = s.set_region(DT, data, (0, 0), DT.mpp / 0.5, DT.mpp, (0, 0, 80, 80))
    wr.data[5:25, 5:25] = 1 - wr.data[5:25, 5:25]
    s.set_reviewed(DT)
    s.save()
    edited = wr.data.copy()

    class Crash(Exception):
        pass

    real_write, real_store = sess.atomic_write_bytes, sess.write_region_to_store

    def write(path, data, **kw):
        if (crash_at == "state" and Path(path).name == "session.json") or \
                (crash_at == "commit-file" and Path(path).parent.name == "commits"):
            if crash_at == "commit-file":
                real_write(path, data, **kw)  # the file landed, the process died right after
            raise Crash(path)
        return real_write(path, data, **kw)

    def store_write(*a, **kw):
        raise Crash("store")

    monkeypatch.setattr(sess, "atomic_write_bytes", write)
    if crash_at == "store":
        monkeypatch.setattr(sess, "write_region_to_store", store_write)
    with pytest.raises(Crash):
        s.commit()
    monkeypatch.setattr(sess, "atomic_write_bytes", real_write)
    monkeypatch.setattr(sess, "write_region_to_store", real_store)
    del s, wr
    s2 = CorrectionSession.open(tmp_path / "proj.omniseg", _slide())
    r = s2.regions["distal_tubule"]
    np.testing.assert_array_equal(r.data, edited)
    assert r.reviewed and r.has_uncommitted_edits() and not s2.commits
    (rec,) = s2.commit()
    assert rec.store_written
    np.testing.assert_array_equal(s2.load_commit(rec), edited)
    np.testing.assert_array_equal(LabelStore_read(st.path, DT.name)[0:40, 0:40], edited)
    s3 = CorrectionSession.open(tmp_path / "proj.omniseg", _slide())
    assert [c.id for c in s3.commits] == [rec.id] and not s3.regions["distal_tubule"].has_uncommitted_edits()
    assert [c.id for c in s3.exportable()] == [rec.id]


def LabelStore_read(path, name):
    from napari_omniseg.labels.store import LabelStore

    return LabelStore(path).read(name, 0)


def _store(tmp_path, tissues, shape0=(600, 800), mpp0=0.5, chunk=64):
    from napari_omniseg.labels.store import LabelStore

    st = LabelStore.create(tmp_path / "seg.ome.zarr", tissues, shape0, mpp0, chunk, {"source": "slideA.svs"})
    for t in tissues:
        arr = st.level(t.name, 0)
        arr[...] = _pred(arr.shape, t.id)
    st.finalize(tissues)
    return st


def test_commit_writes_back_into_the_label_store(tmp_path):
    from napari_omniseg.labels.aggregate import complete_map
    from napari_omniseg.labels.store import MAP_NAME, LabelStore

    tissues = [DT, PT, CAP]
    st = _store(tmp_path, tissues)
    s = _session(tmp_path)
    s.store_path = str(st.path)
    f = DT.mpp / 0.5
    y0, x0 = 37, 51
    data = np.array(st.level(DT.name, 0)[y0 : y0 + 90, x0 : x0 + 70])
    wr = s.set_region(DT, data, (y0, x0), f, DT.mpp, (int(x0 * f), int(y0 * f), 140, 180))
    wr.data[10:40, 10:40] = 1
    wr.data[50:60, :] = 0
    s.set_reviewed(DT)
    (rec,) = s.commit()
    assert rec.store_written
    st2 = LabelStore(st.path)
    got = st2.read(DT.name, 0)
    np.testing.assert_array_equal(got[y0 : y0 + 90, x0 : x0 + 70], wr.data)
    # the pyramid and the complete map match a full rebuild
    ref = _store(tmp_path / "ref", tissues)
    ref.level(DT.name, 0)[...] = got
    ref.finalize(tissues)
    for k in range(st2.n_levels(DT.name)):
        np.testing.assert_array_equal(st2.read(DT.name, k), ref.read(DT.name, k))
    np.testing.assert_array_equal(st2.read(MAP_NAME, 0), ref.read(MAP_NAME, 0))
    assert complete_map  # imported for the docs of the rule


def test_write_region_clips_to_the_store(tmp_path):
    st = _store(tmp_path, [DT], shape0=(300, 300))
    data = np.ones((100, 100), np.uint8)
    y0, y1, x0, x1 = write_region_to_store(st, DT, data, (100, 120), [DT])
    assert (y1, x1) == (150, 150)
    assert (st.read(DT.name, 0)[100:, 120:] == 1).all()


# ------------------------------------------------------------------------- export
@pytest.fixture
def source():
    from napari_omniseg._widgets._sources import ArraySource

    rng = np.random.default_rng(3)
    img = rng.integers(0, 255, (1200, 1600, 3), dtype=np.uint8)
    return ArraySource(img, 0.5, name="slideA")


def test_patch_grid_covers_and_ends_flush():
    assert patch_grid(512, 256) == [0, 256]
    assert patch_grid(600, 256) == [0, 256, 344]
    assert patch_grid(100, 256) == [0]


def test_export_writes_patches_masks_and_manifest(tmp_path, source):
    from napari_omniseg.training.data import load_dataset, read_image, read_mask
    from napari_omniseg.training.manifest import MANIFEST_COLUMNS, read_manifest_rows

    s = _session(tmp_path)
    f = DT.mpp / 0.5
    dt = _pred((300, 520))
    dt[:5, :5] = 255  # unknown pixels: that patch is skipped
    s.set_region(DT, dt, (100, 40), f, DT.mpp, (80, 200, 1040, 600), "m@abc")
    s.set_region(PT, _pred((300, 520), 2), (100, 40), f, PT.mpp, (80, 200, 1040, 600), "m@abc")
    s.set_reviewed(DT)
    s.commit([DT.name, PT.name])  # PT committed but not reviewed: never exported
    out = tmp_path / "train"
    res = export_corrections(s, source, out, patch=256, stain="pas")
    # 2 rows x 3 columns of 256 px, minus the one with unknown pixels
    assert res.per_tissue == {"distal_tubule": 5} and res.skipped_unknown == 1
    assert res.val_per_tissue == {"distal_tubule": 1}
    rows = read_manifest_rows(out / "manifest.csv")
    assert len(rows) == 5 and list(rows[0]) == list(MANIFEST_COLUMNS)
    for r in rows:
        assert r["origin"] == "correction" and r["tissue"] == "distal_tubule" and r["model_version"] == "m@abc"
        assert r["source_slide"] == "/data/slideA.svs" and float(r["mpp"]) == 1.0 and r["stain"] == "pas"
        img = read_image(out / r["image_path"])
        m = read_mask(out / r["label_path"])
        assert img.shape == (256, 256, 3) and m.shape == (256, 256)
        x, y = int(r["x"]), int(r["y"])
        np.testing.assert_array_equal(img, source.read_at_mpp(1.0, y, x, 256, 256))
        gy, gx = y // 2 - 100, x // 2 - 40  # position in the working region
        np.testing.assert_array_equal(m, dt[gy : gy + 256, gx : gx + 256] == 1)
    assert sorted(r["split"] for r in rows) == ["train"] * 4 + ["val"]
    # the folder loads as a dataset (manifest) with the right tissue
    samples = load_dataset(out)
    assert len(samples) == 5 and {x.tissue.name for x in samples} == {"distal_tubule"}
    assert {x.origin for x in samples} == {"correction"}
    # nothing left to export; exporting again writes nothing
    assert s.exportable() == []
    assert export_corrections(s, source, out).n_patches == 0


def test_export_never_overwrites(tmp_path, source):
    s = _session(tmp_path)
    s.set_region(DT, _pred((200, 200)), (0, 0), 2.0, 1.0, (0, 0, 400, 400))
    s.set_reviewed(DT)
    (rec,) = s.commit()
    out = tmp_path / "train"
    import hashlib

    tag = hashlib.sha1(s.slide.path.encode()).hexdigest()[:6]
    name = f"slideA-{tag}-dt-c{rec.id}-x0-y0-200x200"
    folder = out / "0_1_dt" / "corrections"
    folder.mkdir(parents=True)
    (folder / f"{name}.png").write_bytes(b"precious")
    res = export_corrections(s, source, out, patch=256)
    assert res.n_patches == 1
    assert (folder / f"{name}.png").read_bytes() == b"precious"
    assert (folder / f"{name}-1.png").exists() and (folder / f"{name}-1_mask_dt.png").exists()
    # an interrupted export repeated: rows already in the manifest are not duplicated
    rec.exported = False
    res2 = export_corrections(s, source, out, commits=[rec])
    assert res2.n_patches == 0 and res2.skipped_existing == 1


def test_two_slides_with_one_stem_export_into_one_folder(tmp_path, source):
    """s1/kidney.ome.tif and s2/kidney.ome.tif: both slides' corrections are written."""
    out = tmp_path / "train"
    results = []
    for k in (1, 2):
        slide = SlideInfo("kidney.ome.tif", (1200, 1600), 0.5, f"/data/s{k}/kidney.ome.tif")
        s = CorrectionSession.open(tmp_path / f"p{k}.omniseg", slide)
        s.set_region(DT, _pred((200, 200), seed=k), (0, 0), 2.0, 1.0, (0, 0, 400, 400))
        s.set_reviewed(DT)
        s.commit()
        results.append(export_corrections(s, source, out, patch=256))
        assert s.exportable() == []
    assert [r.n_patches for r in results] == [1, 1] and results[1].skipped_existing == 0
    rows = read_manifest_rows(out / "manifest.csv")
    assert len(rows) == 2 and len({r["image_path"] for r in rows}) == 2
    assert {r["source_slide"] for r in rows} == {"/data/s1/kidney.ome.tif", "/data/s2/kidney.ome.tif"}


def test_an_interrupted_export_leaves_no_orphans_and_is_completed_next_time(tmp_path, source, monkeypatch):
    from napari_omniseg.corrections import export as ex
    from napari_omniseg.training.data import load_folder

    s = _session(tmp_path)
    s.set_region(DT, _pred((300, 300)), (0, 0), 2.0, 1.0, (0, 0, 600, 600))
    s.set_reviewed(DT)
    s.commit()
    out = tmp_path / "train"
    real, calls = ex.atomic_write_bytes, []

    def dying(path, data, **kw):
        calls.append(path)
        if len(calls) == 7:  # the journal, two patches and the image of a third: then the process dies
            raise KeyboardInterrupt
        return real(path, data, **kw)

    monkeypatch.setattr(ex, "atomic_write_bytes", dying)
    with pytest.raises(KeyboardInterrupt):
        export_corrections(s, source, out, patch=128)
    monkeypatch.setattr(ex, "atomic_write_bytes", real)
    written = [p for p in out.rglob("*.png")]
    assert len(written) == 5 and (out / ex.JOURNAL).exists() and not (out / "manifest.csv").exists()
    assert len(s.exportable()) == 1  # not marked exported
    res = export_corrections(s, source, out, patch=128)
    assert res.cleaned_orphans == 5 and res.n_patches == 9 and not (out / ex.JOURNAL).exists()
    pngs = sorted(p.name for p in out.rglob("*.png"))
    assert len(pngs) == 18 and not any("-1.png" in n or "-1_mask" in n for n in pngs)
    assert len(load_folder(out)) == 9  # every image has its mask: the Omni-Seg layout loads
    assert s.exportable() == []


def test_export_of_the_session_reopened_after_a_crash(tmp_path, source):
    s = _session(tmp_path)
    wr = s.set_region(DT, _pred((260, 260)), (0, 0), 2.0, 1.0, (0, 0, 520, 520))
    wr.data[:] = 0
    wr.data[20:80, 20:80] = 1
    s.set_reviewed(DT)
    s.commit()
    del s, wr
    s2 = CorrectionSession.open(tmp_path / "proj.omniseg", _slide())
    res = export_corrections(s2, source, tmp_path / "train", patch=128)
    assert res.per_tissue == {"distal_tubule": 9}


# ------------------------------------------------------------------------- fine-tune
@pytest.fixture
def exported(tmp_path, source):
    s = _session(tmp_path)
    rng = np.random.default_rng(0)
    lab = np.zeros((256, 384), np.uint8)
    for _ in range(12):
        y, x = rng.integers(0, 220, 2)
        lab[y : y + 30, x : x + 40] = 1
    s.set_region(DT, lab, (0, 0), 2.0, 1.0, (0, 0, 768, 512))
    s.set_reviewed(DT)
    s.commit()
    res = export_corrections(s, source, tmp_path / "train", patch=128)
    assert res.n_patches == 6 and res.val_per_tissue == {"distal_tubule": 1}
    return tmp_path / "train"


@pytest.fixture
def registry(tmp_path):
    from napari_omniseg.model import ModelRegistry, new_checkpoint, save_checkpoint

    reg = ModelRegistry(tmp_path / "models")
    ck = new_checkpoint(seed=0)
    p = save_checkpoint(ck.model, reg.root / "base.safetensors", ck.tissues)
    reg.set_active(p)
    return reg


def test_finetune_writes_a_new_version_and_leaves_active_alone(exported, registry):
    from napari_omniseg.corrections.finetune import FinetuneConfig, activate, finetune, rollback
    from napari_omniseg.model import load_checkpoint

    before = registry.active()
    events = []
    res = finetune(exported, registry, None, FinetuneConfig(epochs=1, crop=64, batch_size=2), events.append)
    assert res.path.exists() and res.path.parent == registry.root and res.path != before
    assert registry.active() == before  # not activated by itself
    assert res.n_train == 5 and res.n_val == 1
    assert res.before is not None and res.after is not None
    assert 0.0 <= res.after_dice <= 1.0 and "distal_tubule" in res.per_tissue
    assert any(e.get("phase") == "epoch" for e in events)
    ck = load_checkpoint(res.path)
    assert ck.provenance["parent"].startswith("base@") and ck.provenance["origin"] == "corrections"
    prev = activate(registry, res.path)
    assert prev == before and registry.active() == res.path
    rollback(registry, prev)
    assert registry.active() == before


def test_finetune_cancel_and_failure_write_nothing(exported, registry, tmp_path):
    from napari_omniseg.corrections.finetune import FinetuneConfig, FinetuneError, finetune
    from napari_omniseg.training.loop import TrainingCancelled

    files = sorted(registry.root.iterdir())
    active = registry.active()
    calls = {"n": 0}

    def stop_later():
        calls["n"] += 1
        return calls["n"] > 2

    with pytest.raises(TrainingCancelled):
        finetune(exported, registry, None, FinetuneConfig(epochs=2, crop=64, batch_size=2), should_stop=stop_later)
    assert sorted(registry.root.iterdir()) == files and registry.active() == active
    with pytest.raises(FinetuneError, match="export reviewed corrections first"):
        finetune(tmp_path / "empty", registry)
    assert sorted(registry.root.iterdir()) == files and registry.active() == active


def test_a_project_open_in_another_process_is_refused_by_name(tmp_path):
    """Two processes on one project would overwrite each other's regions and commits:
    the second is refused with the first one's pid, and may open it once that ends."""
    import subprocess
    import sys

    from napari_omniseg.corrections.session import ProjectInUseError

    folder = tmp_path / "shared.omniseg"
    code = (
        "import sys, time\n"
        "from napari_omniseg.corrections import CorrectionSession, SlideInfo\n"
        f"CorrectionSession.open({str(folder)!r}, SlideInfo('slideA.svs', (1200, 1600), 0.5, '/data/slideA.svs'))\n"
        "print('open', flush=True)\n"
        "sys.stdin.readline()\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "open"
        with pytest.raises(ProjectInUseError, match=f"process {p.pid}"):
            CorrectionSession.open(folder, _slide())
    finally:
        p.communicate("\n", timeout=60)
    s = CorrectionSession.open(folder, _slide())  # the other process has ended
    assert s.folder == folder


_RACE = """
import sys, numpy as np
from napari_omniseg.corrections import CorrectionSession, SlideInfo
from napari_omniseg.tissues import get_tissue
store, proj, row0 = sys.argv[1], sys.argv[2], int(sys.argv[3])
DT = get_tissue("distal_tubule")
s = CorrectionSession.open(proj, SlideInfo("slideA.svs", (600, 800), 0.5, "/data/slideA.svs"))
s.store_path = store
f = DT.mpp / 0.5
for y in range(row0, row0 + 32):  # one-row commits, all inside the store's chunk (0, 0)
    s.set_region(DT, np.ones((1, 64), np.uint8), (y, 0), f, DT.mpp, (0, int(y * f), int(64 * f), int(f)))
    s.set_reviewed(DT)
    s.commit()
"""


def test_two_processes_committing_into_one_store_chunk_lose_nothing(tmp_path):
    import subprocess
    import sys

    from napari_omniseg.labels.store import LabelStore

    st = LabelStore.create(tmp_path / "seg.ome.zarr", [DT], (600, 800), 0.5, 64, {"source": "slideA.svs"})
    st.level(DT.name, 0)[...] = 0
    st.finalize([DT])
    procs = [subprocess.Popen([sys.executable, "-c", _RACE, str(st.path), str(tmp_path / f"p{k}.omniseg"), str(32 * k)])
             for k in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    got = LabelStore(st.path).read(DT.name, 0)
    assert int(got[:64, :64].sum()) == 64 * 64, "rows of one process were overwritten by the other"


def test_finetune_on_erased_artery_crops_keeps_the_artery(tmp_path):
    """The shipped model, a real PAS artery patch (bundled) corrected to its annotation
    and exported as 128 px crops, two of the four without artery: the fine-tuned model
    must still find the artery. Before crops annotated empty were kept out of threshold
    calibration, they voted for the top cut (0.90) and the artery vanished."""
    from napari_omniseg._widgets._sources import ArraySource
    from napari_omniseg.corrections.finetune import FinetuneConfig, finetune
    from napari_omniseg.demo import bundled_samples
    from napari_omniseg.inference.engine import EngineConfig, Segmenter, segment_region
    from napari_omniseg.model import ModelRegistry, load_checkpoint, shipped_checkpoint
    from napari_omniseg.training.data import Sample, load_arrays, load_dataset
    from napari_omniseg.training.loop import evaluate_samples

    art = get_tissue("artery")
    sample = next(s for s in bundled_samples() if s.tissue.name == "artery" and s.stain == "pas")
    img, truth = sample.image, (np.asarray(sample.mask) > 0).astype(np.uint8)
    h, w = truth.shape
    parent = load_checkpoint(shipped_checkpoint())
    src = ArraySource(img, art.mpp, name="artery-pas")
    s = CorrectionSession.open(tmp_path / "p.omniseg", SlideInfo("artery-pas", (h, w), art.mpp))
    res, _ = segment_region(Segmenter(parent, EngineConfig(core=256, margin=32, threads=1)), src, (0, 0, w, h),
                            ["artery"])
    r = res["artery"]
    s.set_region(art, truth, r.origin, r.factor, r.mpp, (0, 0, w, h), parent.version, force=True)
    s.set_reviewed(art)
    s.commit(["artery"])
    export_corrections(s, src, tmp_path / "train", patch=128)
    shows = [bool(np.asarray(x.mask).any()) for x in load_arrays(load_dataset(tmp_path / "train"))]
    assert sorted(shows) == [False, False, True, True]
    reg = ModelRegistry(tmp_path / "models")
    ft = finetune(tmp_path / "train", reg, shipped_checkpoint(), FinetuneConfig(epochs=1, threads=1))
    ck = load_checkpoint(ft.path)
    # two crops show the artery, too few to recalibrate it: the parent's cut stays
    assert ck.thresholds["artery"] == parent.thresholds["artery"]
    whole = [Sample(None, None, art, image=img, mask=truth > 0)]
    _, before = evaluate_samples(parent, whole)
    _, after = evaluate_samples(ck, whole)
    # the shipped model finds part of this artery (Dice 0.260; the model before 0.331), and
    # the fine-tune must keep most of what it found
    assert before["mean_dice"] > 0.2 and after["mean_dice"] > 0.8 * before["mean_dice"], (before, after)
