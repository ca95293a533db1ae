"""Which checkpoint is active, and where fine-tuned versions live.

The registry is a folder (``$OMNISEG_HOME/models`` or
``~/.local/share/napari-omniseg/models``) of immutable checkpoints plus one small
file, ``active.json``, that names the active one and is replaced atomically.
With no active checkpoint, the model shipped inside the package is used.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .checkpoint import CheckpointError, atomic_write_bytes, read_sidecar

PACKAGE_WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
SHIPPED_NAME = "omniseg-renal-demo.safetensors"


def shipped_checkpoint() -> Path | None:
    """The checkpoint bundled with the package, or ``None`` if this build has none."""
    p = PACKAGE_WEIGHTS / SHIPPED_NAME
    return p if p.exists() else None


def default_home() -> Path:
    env = os.environ.get("OMNISEG_HOME")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "napari-omniseg"


class ModelRegistry:
    def __init__(self, root: "str | Path | None" = None):
        self.root = Path(root) if root is not None else default_home() / "models"

    @property
    def active_file(self) -> Path:
        return self.root / "active.json"

    def versions(self) -> list[Path]:
        """Checkpoints in the registry folder (oldest first), then the shipped one."""
        found = sorted(self.root.glob("*.safetensors"), key=lambda p: p.stat().st_mtime) if self.root.exists() else []
        ship = shipped_checkpoint()
        return found + ([ship] if ship else [])

    def active(self) -> Path | None:
        """The active checkpoint: the one ``active.json`` names, else the shipped one."""
        if self.active_file.exists():
            try:
                name = json.loads(self.active_file.read_text())["path"]
            except (ValueError, KeyError):
                raise CheckpointError(f"{self.active_file} is not valid; delete it to fall back to the shipped model") from None
            p = Path(name)
            if not p.is_absolute():
                p = self.root / p
            if p.exists():
                return p
            raise CheckpointError(f"{self.active_file} names {p}, which does not exist")
        return shipped_checkpoint()

    def set_active(self, path: "str | Path") -> None:
        """Make ``path`` the active checkpoint (checks that it is a valid checkpoint first)."""
        path = Path(path).resolve()
        read_sidecar(path)
        rel = path.name if path.parent == self.root.resolve() else str(path)
        body = {"path": rel, "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write_bytes(self.active_file, json.dumps(body, indent=2).encode())

    def reset_active(self) -> None:
        """Fall back to the shipped model."""
        if self.active_file.exists():
            self.active_file.unlink()

    def new_version_path(self, stem: str = "finetuned") -> Path:
        """A fresh, unused checkpoint path in the registry folder."""
        self.root.mkdir(parents=True, exist_ok=True)
        ts = time.strftime("%Y%m%d-%H%M%S")
        i = 0
        while True:
            p = self.root / f"{stem}-{ts}{'' if i == 0 else f'-{i}'}.safetensors"
            if not p.exists() and not p.with_suffix(".json").exists():
                return p
            i += 1


def resolve_checkpoint(arg: "str | Path | None" = None, registry: ModelRegistry | None = None) -> Path:
    """A user's ``--checkpoint`` (None means the active one) as an existing path."""
    if arg:
        p = Path(arg)
        if not p.exists():
            raise CheckpointError(f"checkpoint {p} does not exist")
        return p
    reg = registry or ModelRegistry()
    p = reg.active()
    if p is None:
        raise CheckpointError(
            "no checkpoint given and this installation has no shipped model; pass --checkpoint or train one with `omniseg train`"
        )
    return p
