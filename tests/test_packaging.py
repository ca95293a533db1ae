"""The wheel a user installs carries everything the package needs offline: the
manifest, the shipped model and the bundled sample (a wheel built from this tree,
installed into an empty folder, then imported from there)."""

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "napari_omniseg"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "tree"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
    out = tmp / "dist"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                        "--no-index", "-q", "-w", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = out.glob("napari_omniseg-*.whl")
    return whl


def test_wheel_holds_every_data_file_of_the_package(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    data = [p for p in PKG.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
    assert len(data) >= 10  # manifest, model + sidecar, sample images, labels and index
    missing = [str(p.relative_to(PKG.parent)) for p in data if str(p.relative_to(PKG.parent)) not in names]
    assert not missing, f"left out of the wheel: {missing}"
    weights = [i for i in zipfile.ZipFile(wheel).infolist() if i.filename.startswith("napari_omniseg/weights/")]
    assert 0 < sum(i.file_size for i in weights) < 20e6


def test_installed_wheel_finds_its_model_and_sample(wheel, tmp_path):
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", str(wheel), "--no-deps", "--no-index", "-q",
                        "--target", str(target)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    code = (
        "import json, napari_omniseg as p\n"
        "from napari_omniseg.model import load_checkpoint, shipped_checkpoint\n"
        "from napari_omniseg.demo import SAMPLE_DIR, sample_index\n"
        "ck = load_checkpoint(shipped_checkpoint())\n"
        "idx = sample_index()\n"
        "print(json.dumps({'pkg': p.__file__, 'ckpt': str(shipped_checkpoint()), 'tissues': [t.name for t in ck.tissues],"
        " 'sample': sorted(x.name for x in SAMPLE_DIR.iterdir())}))\n"
    )
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["pkg"].startswith(str(target)) and got["ckpt"].startswith(str(target))
    assert len(got["tissues"]) == 6
    for name in ("renal_5x.ome.tif", "renal_10x.ome.tif", "renal_40x.ome.tif", "sample.json", "CMU-1-Small-Region.svs"):
        assert name in got["sample"]
