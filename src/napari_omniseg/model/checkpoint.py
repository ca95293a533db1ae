"""Checkpoints: safetensors weights plus a JSON sidecar.  Never pickle.

``model.safetensors`` holds the tensors only.  ``model.json`` (same stem) holds:

- ``format``: ``"napari-omniseg-checkpoint"``, ``format_version``
- ``architecture``: :class:`NetConfig` fields
- ``tissues``: the tissue registry the model was trained for (name, id, magnification, colour)
- ``normalization``: input range, mean and std per channel
- ``provenance``: data manifest hashes, epochs, seed, parent checkpoint, command, time
- ``metrics``: validation scores
- ``thresholds`` (optional): per tissue name, the foreground probability above which a
  pixel is that tissue (default 0.5), calibrated on the training patches
- ``weights_sha256``: SHA-256 of the ``.safetensors`` file; checked on load
- ``dtype``: the stored dtype (``float32`` or ``float16``); loading always yields float32

A checkpoint is immutable once written: :func:`save_checkpoint` refuses to replace
an existing file, and writes through a temporary file that is fsynced and renamed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .._io import apply_umask, atomic_write_bytes, fsync_dir as _fsync_dir
from ..tissues import TISSUES, Tissue, tissues_from_json, tissues_to_json
from .network import NetConfig, OmniSegNet

FORMAT = "napari-omniseg-checkpoint"
FORMAT_VERSION = 1
DEFAULT_NORMALIZATION = {"range": [0.0, 1.0], "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}


class CheckpointError(ValueError):
    """A checkpoint file is missing, tampered with, truncated or does not fit the model."""


@dataclass
class Checkpoint:
    model: OmniSegNet
    tissues: tuple[Tissue, ...]
    path: Path | None = None
    normalization: dict = field(default_factory=lambda: dict(DEFAULT_NORMALIZATION))
    provenance: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    sha256: str = ""
    #: tissue name -> decision threshold on the foreground probability (0.5 if absent)
    thresholds: dict = field(default_factory=dict)

    def threshold(self, tissue: "Tissue | str") -> float:
        """The foreground-probability threshold of one tissue (0.5 unless calibrated)."""
        name = tissue.name if isinstance(tissue, Tissue) else str(tissue)
        return float(self.thresholds.get(name, 0.5))

    @property
    def version(self) -> str:
        """Short identifier: file stem plus the first 8 hex digits of the weights hash."""
        stem = self.path.stem if self.path else "unsaved"
        return f"{stem}@{self.sha256[:8]}" if self.sha256 else stem

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or [0,1] float N x 3 x H x W -> the network's input."""
        # one scale and one shift per channel, in place on a fresh float copy: two passes
        # over the pixels instead of four (this runs on every tile the engine segments)
        mean = torch.tensor(self.normalization["mean"], dtype=torch.float64).view(1, -1, 1, 1)
        std = torch.tensor(self.normalization["std"], dtype=torch.float64).view(1, -1, 1, 1)
        scale = 1.0 / std / (255.0 if images.dtype == torch.uint8 else 1.0)
        x = images.to(torch.float32, copy=True)
        return x.mul_(scale.to(x.device, torch.float32)).add_((-mean / std).to(x.device, torch.float32))


def sidecar_path(path: "str | Path") -> Path:
    p = Path(path)
    return p.with_suffix(".json")


def sha256_file(path: "str | Path", chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def all_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.state_dict().values() if p.is_floating_point())


def save_checkpoint(
    model: OmniSegNet,
    path: "str | Path",
    tissues: Sequence[Tissue] = TISSUES,
    *,
    normalization: dict | None = None,
    provenance: dict | None = None,
    metrics: dict | None = None,
    dtype: torch.dtype = torch.float32,
    thresholds: dict | None = None,
) -> Path:
    """Write ``path`` (.safetensors) and its JSON sidecar.  Refuses to overwrite.

    Raises :class:`CheckpointError` if any weight is not finite: a model with NaN or
    Inf is never written.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"checkpoint files must end in .safetensors, got {path.name}")
    if path.exists() or sidecar_path(path).exists():
        raise FileExistsError(f"checkpoint {path} already exists; checkpoints are immutable, choose a new name")
    if len(tissues) != model.cfg.n_tissues:
        raise CheckpointError(f"model has {model.cfg.n_tissues} tissue slots but {len(tissues)} tissues were given")
    if not all_finite(model):
        raise CheckpointError("refusing to save a model with non-finite weights (NaN or Inf)")
    if thresholds:
        try:
            check_thresholds(thresholds, tissues)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    apply_umask(fd)
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        apply_umask(tmp)  # save_file may recreate the file
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        digest = sha256_file(tmp)
        side = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "architecture": model.cfg.to_dict(),
            "tissues": tissues_to_json(tissues),
            "normalization": normalization or dict(DEFAULT_NORMALIZATION),
            "provenance": {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(provenance or {})},
            "metrics": _jsonable(metrics or {}),
            **({"thresholds": {k: float(v) for k, v in thresholds.items()}} if thresholds else {}),
            "dtype": str(dtype).replace("torch.", ""),
            "n_parameters": sum(v.numel() for v in state.values()),
            "weights_file": path.name,
            "weights_sha256": digest,
        }
        # sidecar first, then the weights: a reader never sees weights without their sidecar
        atomic_write_bytes(sidecar_path(path), json.dumps(side, indent=2).encode(), overwrite=False)
        os.link(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if hasattr(x, "item"):
        return _jsonable(x.item())
    return x


def read_sidecar(path: "str | Path") -> dict:
    path = Path(path)
    side = sidecar_path(path)
    if not side.exists():
        raise CheckpointError(f"{path.name}: sidecar {side.name} is missing (it holds the architecture and the weights hash)")
    try:
        meta = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{side}: sidecar is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{side}: sidecar must be a JSON object, not a {type(meta).__name__}")
    for key, kind in (("architecture", dict), ("tissues", list), ("normalization", dict), ("provenance", dict),
                      ("metrics", dict)):
        if key in meta and not isinstance(meta[key], kind):
            raise CheckpointError(f"{side}: '{key}' must be a JSON {'object' if kind is dict else 'array'}, "
                                  f"not {type(meta[key]).__name__}")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{side}: not a napari-omniseg checkpoint sidecar (format={meta.get('format')!r})")
    try:
        version = int(meta.get("format_version", -1))
    except (TypeError, ValueError):
        raise CheckpointError(f"{side}: format_version must be an integer, not {meta.get('format_version')!r}") from None
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{side}: format version {meta.get('format_version')} is newer than this napari-omniseg reads ({FORMAT_VERSION}); upgrade the package"
        )
    return meta


def check_architecture(cfg: NetConfig) -> None:
    """Refuse sizes no real checkpoint has before anything is allocated (a crafted
    sidecar asking for a 200,000-wide layer would otherwise try to allocate terabytes)."""
    def rng(name, v, lo, hi):
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise ValueError(f"{name} = {v!r} is outside {lo}..{hi}")

    if not 2 <= len(cfg.widths) <= 8 or len(cfg.blocks) != len(cfg.widths):
        raise ValueError(f"widths {list(cfg.widths)} / blocks {list(cfg.blocks)}: 2 to 8 stages, one block count each")
    for w in cfg.widths:
        rng("width", w, 1, 2048)
        if w % cfg.groups:
            raise ValueError(f"width {w} is not a multiple of groups = {cfg.groups}")
    for b in cfg.blocks:
        rng("blocks", b, 1, 16)
    rng("n_tissues", cfg.n_tissues, 1, 256)
    rng("n_scales", cfg.n_scales, 1, 16)
    rng("head_channels", cfg.head_channels, 1, 64)
    rng("in_channels", cfg.in_channels, 1, 16)
    rng("groups", cfg.groups, 1, 2048)
    if any(not isinstance(v, int) or not 0 <= v < cfg.n_scales for v in cfg.tissue_scales):
        raise ValueError(f"tissue_scales {list(cfg.tissue_scales)} must be scale ids 0..{cfg.n_scales - 1}")


def check_normalization(norm) -> None:
    """Mean and std per input channel, finite, std > 0 (a zero std turns every image into NaN or Inf)."""
    import math

    if not isinstance(norm, dict):
        raise ValueError(f"normalization must be an object, got {type(norm).__name__}")
    for key in ("mean", "std"):
        v = norm.get(key)
        if not isinstance(v, list) or not v or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in v):
            raise ValueError(f"normalization {key} must be a list of finite numbers, got {v!r}")
    if any(x <= 0 for x in norm["std"]):
        raise ValueError(f"normalization std must be > 0 for every channel, got {norm['std']}")


def check_thresholds(th, tissues: Sequence[Tissue]) -> None:
    """Decision thresholds: an object of known tissue names to numbers in [0.01, 0.99]."""
    if not isinstance(th, dict):
        raise ValueError(f"thresholds must be an object of tissue name -> number, got {type(th).__name__}")
    names = {t.name for t in tissues}
    for k, v in th.items():
        if k not in names:
            raise ValueError(f"thresholds name an unknown tissue {k!r}")
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not (0.01 <= float(v) <= 0.99):
            raise ValueError(f"threshold of {k} must be a number in 0.01..0.99, got {v!r}")


def load_checkpoint(path: "str | Path", device: "str | torch.device" = "cpu", verify: bool = True) -> Checkpoint:
    """Load a checkpoint; never unpickles.

    Checks, each with an error naming the file and the problem: the file exists and
    is a safetensors file; the sidecar exists and is ours; the SHA-256 matches; the
    tensors have exactly the names, shapes and a floating dtype the architecture needs.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix != ".safetensors":
        raise CheckpointError(
            f"{path.name}: only .safetensors checkpoints are loaded (pickled .pt/.pth files can run code and are refused)"
        )
    meta = read_sidecar(path)
    if verify:
        digest = sha256_file(path)
        if digest != meta.get("weights_sha256"):
            raise CheckpointError(
                f"{path.name}: SHA-256 mismatch (file {digest[:12]}..., sidecar {str(meta.get('weights_sha256'))[:12]}...): "
                "the weights were modified, truncated or belong to another sidecar"
            )
    try:
        cfg = NetConfig.from_dict(meta["architecture"])
        check_architecture(cfg)
        tissues = tissues_from_json(meta["tissues"])
        check_normalization(meta.get("normalization", dict(DEFAULT_NORMALIZATION)))
        check_thresholds(meta.get("thresholds", {}), tissues)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{sidecar_path(path).name}: bad architecture, tissue list, normalisation or thresholds ({e})") from None
    if len(tissues) != cfg.n_tissues:
        raise CheckpointError(f"{path.name}: sidecar lists {len(tissues)} tissues for {cfg.n_tissues} tissue slots")
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path.name}: cannot read the safetensors file ({e}); it may be truncated or corrupt") from None
    model = OmniSegNet(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{path.name}: tensors do not match the architecture (missing: {missing[:5]}{'...' if len(missing) > 5 else ''}; "
            f"unexpected: {extra[:5]}{'...' if len(extra) > 5 else ''})"
        )
    for k, v in expected.items():
        got = state[k]
        if tuple(got.shape) != tuple(v.shape):
            raise CheckpointError(f"{path.name}: tensor {k} has shape {tuple(got.shape)}, the architecture needs {tuple(v.shape)}")
        if not got.is_floating_point():
            raise CheckpointError(f"{path.name}: tensor {k} has dtype {got.dtype}, expected a floating dtype")
        state[k] = got.to(torch.float32)
    model.load_state_dict(state)
    if not all_finite(model):
        raise CheckpointError(f"{path.name}: contains non-finite weights (NaN or Inf)")
    model.eval().to(device)
    return Checkpoint(
        model=model,
        tissues=tissues,
        path=path,
        normalization=meta.get("normalization", dict(DEFAULT_NORMALIZATION)),
        provenance=meta.get("provenance", {}),
        metrics=meta.get("metrics", {}),
        sha256=meta.get("weights_sha256", ""),
        thresholds={k: float(v) for k, v in meta.get("thresholds", {}).items()},
    )


def new_checkpoint(tissues: Sequence[Tissue] = TISSUES, cfg: NetConfig | None = None, seed: int | None = None) -> Checkpoint:
    """A freshly initialised model for the given tissues (scales follow the registry)."""
    if cfg is None:
        cfg = NetConfig(n_tissues=len(tissues), tissue_scales=tuple(t.scale_id for t in tissues))
    if seed is not None:
        torch.manual_seed(seed)
    return Checkpoint(model=OmniSegNet(cfg), tissues=tuple(tissues))
