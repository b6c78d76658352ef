"""Keeps the C allocator's freed memory for reuse: on a virtual machine, handing the large tensors of each forward
pass back to the system and faulting them in again cost more than the convolutions (bench/RESULTS.md)."""
from __future__ import annotations

import ctypes
import ctypes.util
import os

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
ENV = "BINSIGHT_KEEP_FREED_MEMORY"  # "0" turns it off


def keep_freed_memory() -> bool:
    """Large blocks come from the heap (not one mapping each) and the heap is never trimmed, so a freed activation's
    pages are reused by the next one instead of being returned and zero-filled again. True when it took effect (glibc
    only; elsewhere nothing changes)."""
    if os.environ.get(ENV, "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False
