"""Process-level settings that make CPU work faster without changing any result.

``tune_cpu_allocator``: glibc's malloc returns every buffer above its mmap threshold (128 KiB at first, adapting
upwards) to the kernel when it is freed, and the kernel zero-fills the fresh pages of the next one on first touch.
A training step allocates and frees the same activation and gradient buffers every step, so on a CPU a sizeable
share of its time went to page faults (about 1 million minor faults per 30 s on the 2-core reference machine).
Raising the mmap and trim thresholds keeps those buffers in the heap for reuse. Measured on the reference machine,
U-Net training steps ran 5-12% faster, with 3x fewer page faults and the same peak memory (benchmarks/peers.py
applies it to edmkit, as ``edmkit`` does; any program can call it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # glibc mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's largest allowed mmap threshold on 64-bit (4 * 1024 * 1024 * sizeof(long))


def tune_cpu_allocator(*, mmap_threshold: int = MMAP_THRESHOLD_MAX, trim_threshold: int = 1 << 30) -> bool:
    """Keep freed buffers up to ``mmap_threshold`` bytes in the heap, and up to ``trim_threshold`` bytes of free heap,
    instead of giving them back to the kernel (glibc ``mallopt``). Results are unchanged; only allocation costs drop.

    Returns:
        True when applied (Linux with glibc); False elsewhere (other platforms and C libraries are left alone).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(mallopt(M_TRIM_THRESHOLD, int(trim_threshold)))
