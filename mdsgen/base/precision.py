"""Which devices run bfloat16 matrix kernels natively: there bf16 autocast pays (1.7x for the demo's training
step and its HiFi-GAN on an AVX-512-BF16 CPU, BENCHMARKS.md 4); elsewhere on a CPU it is emulated and slower.
"auto" picks bf16 where it is native and fp32 elsewhere, so one recipe runs at its best on either machine."""
from __future__ import annotations

import contextlib
import sys
from functools import lru_cache
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16")


@lru_cache(maxsize=None)
def native_bf16(device_type: str) -> bool:
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.is_file() else ""
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def resolve(device_type: str, precision: str, what: str) -> str:
    """"fp32" or "bf16": `precision` itself, or for "auto" bf16 where `device_type` runs it natively."""
    if precision not in PRECISIONS:
        raise ValueError(f"{what} {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if native_bf16(device_type) else "fp32"
    return precision


def autocast(device_type: str, precision: str, what: str):
    """bf16 autocast on `device_type` (said on stderr once when the device emulates it), or nothing for fp32;
    "auto" resolves per device (`resolve`)."""
    if resolve(device_type, precision, what) == "fp32":
        return contextlib.nullcontext()
    if not native_bf16(device_type):
        _warn_once(what, device_type)
    return torch.autocast(device_type, dtype=torch.bfloat16)


@lru_cache(maxsize=None)
def _warn_once(what: str, device_type: str) -> None:
    print(f"{what} bf16: this {device_type} has no native bf16 matrix kernels, so autocast emulates them and is "
          f"slower than fp32; set {what}: fp32", file=sys.stderr)
