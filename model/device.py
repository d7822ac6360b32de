"""Where torch runs and at which precision: one place, so serving and training agree."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

import torch

CpuDtype = Literal["auto", "fp32", "bf16"]


# Instruction-set flags that decide this project's speed on a CPU (benchmarks report them):
# int8 (VNNI), bf16 in AVX-512 or in AMX tiles, which runs large bf16 products ~10x fp32.
COMPUTE_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX). Without it torch
    emulates bf16 and is several times slower than fp32 (measured on a 2-core AVX2 EPYC:
    MiniLM-L6 over 50 pairs, 1.3 s fp32 vs 9.7 s bf16)."""
    return any(flag in _cpuinfo().split() for flag in ("avx512_bf16", "amx_bf16"))


def cpu_description(cpuinfo: str | None = None) -> dict[str, object]:
    """The CPU's model name and which of `COMPUTE_FLAGS` it has, from `/proc/cpuinfo` (or the
    given text): benchmark figures from machines of one size but different CPUs (with and
    without AMX, say) are only comparable with it. Empty values where it cannot be read."""
    text = _cpuinfo() if cpuinfo is None else cpuinfo
    model = ""
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return {"cpu_model": model, "cpu_features": [f for f in COMPUTE_FLAGS if f in flags]}


def resolve_device(preference: Literal["auto", "cpu", "cuda"] = "auto") -> torch.device:
    """`cuda` when asked for or when `auto` and torch sees a GPU; `cpu` otherwise.

    Raises:
        ValueError: `cuda` was asked for and there is none.
    """
    if preference == "cuda" and not torch.cuda.is_available():
        raise ValueError("model.device is 'cuda' but torch sees no GPU")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def autocast_dtype(device: torch.device, cpu_dtype: CpuDtype = "fp32") -> torch.dtype | None:
    """The autocast dtype for inference/training on `device`, or None for plain fp32.

    GPU: bf16 where supported (no loss scaling needed), else fp16. CPU: bf16 when asked, or
    with "auto" when the CPU has bf16 hardware (`cpu_has_fast_bf16`); fp32 otherwise.
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if cpu_dtype == "auto":
        return torch.bfloat16 if cpu_has_fast_bf16() else None
    return torch.bfloat16 if cpu_dtype == "bf16" else None
