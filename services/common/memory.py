"""Giving freed heap back to the operating system after a burst of temporaries (glibc)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any


@functools.cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_free_heap() -> bool:
    """Return the memory that is free inside the C heap to the OS (glibc `malloc_trim(0)`);
    False where the C library has no such call (musl, macOS).

    A re-ranker version's warm-up computes item states in batches of 128 and frees each
    batch's temporaries, but glibc keeps the freed pages in its heaps, where the process's RSS
    still counts them. Measured warming 12,000 synthetic items on the 2-core Xeon (562 MiB of
    states): RSS grew by 730–756 MiB, and by 565 MiB after this call (docs/performance-log.md,
    stop 16).
    """
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
