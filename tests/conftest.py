import csv
import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

DEMO = Path(__file__).resolve().parents[2] / "shared" / "data" / "renal-demo"
if not DEMO.exists():  # CI clones the repo beside shared/ too; allow an override
    DEMO = Path(os.environ.get("OMNISEG_DEMO_DATA", DEMO))
#: OMNISEG_TESTS_WITHOUT_SHARED=1 runs the suite as a bare clone would (no ../shared)
BARE = os.environ.get("OMNISEG_TESTS_WITHOUT_SHARED") == "1" or not DEMO.exists()

#: the split each bundled patch gets in the generated demo folder (per tissue, in order)
_MINI_SPLITS = ("train", "val", "test", "train", "train", "train")


def _write_mini_demo(root: Path) -> Path:
    """A renal-demo-like folder (Omni-Seg layout, data_list.csv, splits.csv) from the 23
    real patches bundled in the package: every tissue has train, val and test patches."""
    import imageio.v3 as iio
    import numpy as np

    from napari_omniseg.demo import bundled_samples

    rows, seen = [], {}
    for s in bundled_samples():
        rel = Path(s.meta["file"])  # KI_data_testingset_demo/<task>_<scale>_<name>/<stain>/im_X.png
        img = root / rel
        img.parent.mkdir(parents=True, exist_ok=True)
        iio.imwrite(img, s.image)
        name = rel.parent.parent.name.split("_", 2)[2]
        msk = img.with_name(f"{img.stem}_mask_{name}.png")
        iio.imwrite(msk, (s.mask.astype(np.uint8) * 255))
        k = seen.get(s.tissue.name, 0)
        seen[s.tissue.name] = k + 1
        rows.append((str(rel), str(msk.relative_to(root)), s.tissue, s.stain, _MINI_SPLITS[min(k, 5)]))
    with open(root / "data_list.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_path", "label_path", "name", "task_id", "scale_id"])
        for im, lb, t, _st, _sp in rows:
            w.writerow([im, lb, im.replace("/", "-"), t.id, t.scale_id])
    with open(root / "splits.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_path", "label_path", "tissue", "task_id", "stain", "magnification", "split"])
        for im, lb, t, st, sp in rows:
            w.writerow([im, lb, t.name, t.id, st, t.magnification, sp])
    return root


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """The renal demo data (../shared), or, on a bare clone, a small folder of the same
    layout written from the real patches bundled in the package."""
    if not BARE:
        return DEMO
    return _write_mini_demo(tmp_path_factory.mktemp("renal-demo-mini"))


@pytest.fixture(scope="session")
def full_demo(demo_dir) -> Path:
    """Only for tests of the full 110-patch demo set itself (its counts and layout)."""
    if BARE:
        pytest.skip("needs the full renal-demo data in ../shared (the bundled patches cover everything else)")
    return demo_dir


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Never touch the user's real model registry from tests."""
    monkeypatch.setenv("OMNISEG_HOME", str(tmp_path_factory.mktemp("omniseg_home")))


def _skipped(config):
    tr = config.pluginmanager.get_plugin("terminalreporter")
    return tr.stats.get("skipped", []) if tr is not None else []


def pytest_sessionfinish(session, exitstatus):
    """With OMNISEG_MAX_SKIPS=N (CI sets it), more than N skipped tests fail the run: a
    suite that silently skips is a suite that silently tests less."""
    limit = os.environ.get("OMNISEG_MAX_SKIPS")
    if limit is not None and len(_skipped(session.config)) > int(limit) and session.exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    limit = os.environ.get("OMNISEG_MAX_SKIPS")
    if limit is None:
        return
    skipped = _skipped(config)
    reasons = sorted({str(r.longrepr[2]) if isinstance(r.longrepr, tuple) else str(r.longrepr) for r in skipped})
    terminalreporter.write_line(f"{len(skipped)} test(s) skipped (at most {limit} allowed): " + "; ".join(reasons))
    if len(skipped) > int(limit):
        terminalreporter.write_line(f"FAILED: more than {limit} tests skipped", red=True)
