"""glibc malloc settings for CPU training: keep freed memory for reuse instead of handing it back to the OS.

A CPU training step allocates and frees dozens of weight-sized tensors. With glibc's defaults, large blocks
are mapped fresh (`mmap`) or trimmed off the heap when freed, so the next step touches new pages: one page
fault per 4 KiB, a few milliseconds per step for a 1M-weight layer (BENCHMARKS.md, "Fused quantizer and
rule"). `keep_freed_memory()` fixes the mmap threshold (blocks under 32 MiB come from the heap) and raises the
trim threshold (up to 1 GiB of freed heap is kept), as `GLIBC_TUNABLES=glibc.malloc.trim_threshold=…:
glibc.malloc.mmap_threshold=…` would at start-up. It is process-wide: `python -m lts_core train` and the
benchmarks call it when training on the CPU; in your own loop call it once, before training. The resident
memory then stays near its peak. A no-op (returning False) where the C library is not glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20     # glibc's largest allowed value on 64-bit systems
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Apply the settings (bytes) to this process's glibc malloc; True when both were accepted."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(mallopt(M_TRIM_THRESHOLD,
                                                                                   int(trim_threshold)))
