import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

DEMO = Path(__file__).resolve().parents[2] / "shared" / "data" / "renal-demo"
if not DEMO.exists():  # CI clones the repo beside shared/ too; allow an override
    DEMO = Path(os.environ.get("OMNISEG_DEMO_DATA", DEMO))


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    if not DEMO.exists():
        pytest.skip(f"renal demo data not found at {DEMO}")
    return DEMO


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Never touch the user's real model registry from tests."""
    monkeypatch.setenv("OMNISEG_HOME", str(tmp_path_factory.mktemp("omniseg_home")))
