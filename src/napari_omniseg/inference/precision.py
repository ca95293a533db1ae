"""Which number format the model runs in, chosen from the hardware.

``auto`` picks bf16 autocast where the hardware computes it fast (CUDA GPUs with bf16,
else fp16; CPUs with AMX or AVX-512 bf16) and fp32 everywhere else: on a CPU without
those instructions bf16 is emulated and slower than fp32.  ``fp32``, ``bf16`` and
``fp16`` force a format (``fp16`` only on CUDA).
"""

from __future__ import annotations

import contextlib
import os

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX-512 bf16 on this CPU (detected by torch at run time, not assumed)."""
    cpu = getattr(torch, "cpu", None)
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        f = getattr(cpu, name, None)
        try:
            if f is not None and f():
                return True
        except Exception:  # noqa: BLE001 - a probe that fails means no
            pass
    return False


def resolve_precision(name: str | None, device: torch.device | str) -> str:
    """The format a run will use on ``device``: ``'fp32'``, ``'bf16'`` or ``'fp16'``."""
    dev = torch.device(device)
    name = (name or "auto").lower()
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; choose one of {', '.join(PRECISIONS)}")
    if name == "auto":
        if dev.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if dev.type == "cpu" and cpu_has_fast_bf16():
            return "bf16"
        return "fp32"
    if name == "fp16" and dev.type != "cuda":
        raise ValueError("fp16 runs only on CUDA devices; use bf16 or fp32 on this device")
    if name == "bf16" and dev.type not in ("cpu", "cuda"):
        raise ValueError(f"bf16 is not supported on {dev.type}; use fp32")
    return name


def autocast(precision: str, device: torch.device | str):
    """A context that runs the model in ``precision`` (a resolved name) on ``device``."""
    dev = torch.device(device)
    if precision == "fp32" or dev.type not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    dt = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(dev.type, dtype=dt)


def describe(device: torch.device | str, precision: str = "auto", threads: int = 0) -> dict:
    """What a run on ``device`` will use: device, precision and CPU threads."""
    dev = torch.device(device)
    out = {"device": str(dev), "precision": resolve_precision(precision, dev)}
    if dev.type == "cpu":
        out["threads"] = int(threads) if threads else torch.get_num_threads()
        out["cpu_fast_bf16"] = cpu_has_fast_bf16()
        out["cpu_cores"] = os.cpu_count()
    return out
