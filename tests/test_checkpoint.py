import json
import pickle

import pytest
import torch

from napari_omniseg.model import CheckpointError, ModelRegistry, load_checkpoint, new_checkpoint, save_checkpoint
from napari_omniseg.model.checkpoint import sidecar_path
from napari_omniseg.model.network import NetConfig, OmniSegNet


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    ck = new_checkpoint(seed=3)
    p = save_checkpoint(ck.model, d / "m.safetensors", provenance={"seed": 3}, metrics={"val_mean_dice": 0.5})
    return ck, p


def test_round_trip_is_bit_exact(saved):
    ck, p = saved
    back = load_checkpoint(p)
    a, b = ck.model.state_dict(), back.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [t.name for t in back.tissues][0] == "distal_tubule"
    meta = json.loads(sidecar_path(p).read_text())
    assert meta["architecture"]["widths"] == [32, 64, 128, 256, 256]
    assert meta["n_parameters"] == 6_913_594 and len(meta["weights_sha256"]) == 64
    assert meta["provenance"]["seed"] == 3 and back.metrics["val_mean_dice"] == 0.5
    assert back.version.startswith("m@")


def test_fp16_storage_halves_size_and_loads_as_float32(saved, tmp_path):
    ck, p = saved
    p16 = save_checkpoint(ck.model, tmp_path / "h.safetensors", dtype=torch.float16)
    assert p16.stat().st_size < 0.55 * p.stat().st_size
    back = load_checkpoint(p16)
    w = back.model.backbone.stem.weight
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, ck.model.backbone.stem.weight.half().float())


def test_checkpoints_are_immutable(saved):
    ck, p = saved
    with pytest.raises(FileExistsError, match="immutable"):
        save_checkpoint(ck.model, p)


def test_tampered_weights_are_refused(saved, tmp_path):
    _, p = saved
    bad = tmp_path / "bad.safetensors"
    data = bytearray(p.read_bytes())
    data[-100] ^= 0xFF
    bad.write_bytes(bytes(data))
    sidecar_path(bad).write_text(sidecar_path(p).read_text())
    with pytest.raises(CheckpointError, match="SHA-256 mismatch"):
        load_checkpoint(bad)


def test_truncated_file_is_refused(saved, tmp_path):
    _, p = saved
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(p.read_bytes()[: 10_000])
    meta = json.loads(sidecar_path(p).read_text())
    from napari_omniseg.model.checkpoint import sha256_file

    meta["weights_sha256"] = sha256_file(bad)  # hash matches: the reader itself must notice
    sidecar_path(bad).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(bad)


def test_mismatched_architecture_is_refused(saved, tmp_path):
    small = OmniSegNet(NetConfig(widths=(16, 32, 64, 128, 128)))
    p = save_checkpoint(small, tmp_path / "small.safetensors")
    meta = json.loads(sidecar_path(p).read_text())
    meta["architecture"]["widths"] = [32, 64, 128, 256, 256]  # lie about the shape
    sidecar_path(p).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="has shape .* the architecture needs"):
        load_checkpoint(p)


def test_missing_sidecar_and_pickles_are_refused(saved, tmp_path):
    _, p = saved
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes(p.read_bytes())
    with pytest.raises(CheckpointError, match="sidecar lone.json is missing"):
        load_checkpoint(lone)

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    pt = tmp_path / "evil.pt"
    pt.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match="only .safetensors"):
        load_checkpoint(pt)
    assert not marker.exists()


def test_nonfinite_weights_never_saved(tmp_path):
    ck = new_checkpoint(seed=0)
    with torch.no_grad():
        ck.model.backbone.stem.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="non-finite"):
        save_checkpoint(ck.model, tmp_path / "nan.safetensors")
    assert not list(tmp_path.iterdir())


def test_registry_active_and_fallback(saved, tmp_path):
    _, p = saved
    reg = ModelRegistry(tmp_path / "models")
    ck = load_checkpoint(p)
    v = reg.new_version_path("ft")
    save_checkpoint(ck.model, v)
    reg.set_active(v)
    assert reg.active() == v
    assert v in reg.versions()
    reg.reset_active()
    assert reg.active() == reg.versions()[-1] or reg.active() is None


def test_written_files_follow_the_umask(tmp_path):
    """mkstemp makes 0600 files; what the project writes must be readable as the umask allows."""
    import os
    import stat

    from napari_omniseg._io import atomic_write_bytes
    from napari_omniseg.model import new_checkpoint, save_checkpoint

    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.json", b"{}")
        ck = new_checkpoint(seed=0)
        p = save_checkpoint(ck.model, tmp_path / "m.safetensors", ck.tissues)
    finally:
        os.umask(old)
    for f in (tmp_path / "a.json", p, p.with_suffix(".json")):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


@pytest.mark.parametrize("edit, words", [
    (lambda d: d["architecture"].__setitem__("widths", [32, 64, 128, 256, 200000]), "outside"),
    (lambda d: d["architecture"].__setitem__("n_tissues", 10**6), "outside"),
    (lambda d: d["normalization"].__setitem__("std", [0, 0, 0]), "std must be > 0"),
    (lambda d: d["normalization"].__setitem__("mean", "abc"), "finite numbers"),
])
def test_crafted_sidecars_are_refused_before_allocating(tmp_path, edit, words):
    import json

    from napari_omniseg.model import new_checkpoint, save_checkpoint
    from napari_omniseg.model.checkpoint import CheckpointError, load_checkpoint, sidecar_path

    ck = new_checkpoint(seed=0)
    p = save_checkpoint(ck.model, tmp_path / "m.safetensors", ck.tissues)
    side = sidecar_path(p)
    d = json.loads(side.read_text())
    edit(d)
    side.write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=words):
        load_checkpoint(p)
