"""The command line's memory policy: memory a command frees is kept for its next tensors, not handed back,
and in 4 KiB pages.

train and verify allocate and free gigabytes of short-lived tensors. glibc serves each block over its mmap
threshold (128 KB, rising to 32 MB) with a fresh mapping and unmaps it on free, so every new activation,
gradient or logit block is first touched page by page. On this project's 2-core machine 50 MB of fresh
memory took 10 ms to fill and 1 ms once reused. With the threshold fixed at its largest (32 MiB) and a high
trim threshold, freed blocks up to 32 MiB stay in the heap and are reused; larger ones are still mapped and
unmapped, so they leave no holes in the heap (serving every block from the heap took an 8B verify's peak
from 7.2 GB to over 7.65). glibc has no other switch for this and torch's CPU allocator caches nothing,
hence mallopt by hand.

numpy asks for transparent huge pages on every array over 4 MB (madvise). Where the kernel compacts memory
to find them at fault time (defrag "madvise", the usual default), filling the arrays stalls: dequantizing
Gemma 3 270M to float32 (1.07 GB) took 8.1 s with huge pages asked for on a heap that served every block,
1.7 s with glibc's default mappings, and 0.65 s in 4 KiB pages. numpy's own switch, NUMPY_MADVISE_HUGEPAGE=0, turns it off.

Measured in BENCHMARKS.md ("Speed, fourth round"). The process keeps what it frees until it exits, or
until release_free_memory gives it back.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 32 << 20  # the largest glibc takes (half its 64 MiB heap size on 64-bit)
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: keep up to 2 GiB of free heap top


def keep_freed_memory() -> bool:
    """Set the policy in this process, before numpy is imported (a user's own MALLOC_* tuning or
    NUMPY_MADVISE_HUGEPAGE is left as it is) → whether glibc's part was set (glibc only)."""
    os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")  # read once, when numpy is imported
    if any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc, not musl: the same call, other constants  # noqa: B018
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def release_free_memory() -> None:
    """Hand the heap's free memory back to the OS now (glibc's malloc_trim: the top and every free page
    inside), where a command moves from one phase to a larger one and the freed blocks would not fit it."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
