"""CPU allocator tuning: keep freed tensor buffers in the heap (glibc only, opt-in).

Every forward pass allocates and frees its feature maps. glibc serves blocks
above its mmap threshold (dynamic, at most 32 MiB by default) with fresh
``mmap`` calls and returns freed heap tops to the OS beyond its trim threshold,
so a large batch pays page faults and zeroing on every layer of every pass: on
the 2-core VMs of docs/benchmarks.md, batch 64 of the bundled model runs at half
the speed of batch 4 untuned, and at the same speed once tuned. Raising
both thresholds makes the heap reuse the same buffers - the same effect as
``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` set before start.

This is a process-wide setting that a library must not make silently:
``perspicio`` (the command) turns it on at start; Python users call
:func:`tune_allocator` once if they want it. The cost is that freed memory
stays reserved by the process instead of going back to the OS. Without it, the
engine keeps output-only chunks small (see :func:`allocator_tuned`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_tuned = False


def tune_allocator(threshold: int = 2**30) -> bool:
    """Raise glibc's mmap and trim thresholds to ``threshold`` bytes (default 1 GiB).

    Returns True when applied (Linux with glibc), False elsewhere (nothing changed).
    """
    global _tuned
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    value = ctypes.c_int(min(int(threshold), 2**31 - 1))
    ok = bool(mallopt(_M_TRIM_THRESHOLD, value)) and bool(mallopt(_M_MMAP_THRESHOLD, value))
    _tuned = _tuned or ok
    return ok


def allocator_tuned() -> bool:
    """True when large freed buffers are reused rather than unmapped: :func:`tune_allocator`
    was called, glibc's thresholds were set in the environment, or the platform is not Linux."""
    if _tuned or not sys.platform.startswith("linux"):
        return True
    return "MALLOC_MMAP_THRESHOLD_" in os.environ or "glibc.malloc.mmap_threshold" in os.environ.get("GLIBC_TUNABLES", "")
