"""The command line's heap policy: memory a command frees is kept for its next tensors, not handed back.

train and verify allocate and free gigabytes of short-lived tensors. glibc serves each block over its mmap
threshold (128 KB, rising to 32 MB) with a fresh mapping and unmaps it on free, so every new activation,
gradient or logit block is first touched page by page. On this project's 2-core machine, 50 MB of fresh
memory took 10 ms to fill and 1 ms once reused; a 4 × 1024-token SmolLM2 step spent ~2 s of 14 s in such
faults. With no mmap and a high trim threshold, freed blocks stay in the heap and are reused. Peak memory
is unchanged (the same tensors are alive at the peak); the process just keeps it until it exits.
glibc has no other switch for this and torch's CPU allocator caches nothing, hence mallopt by hand.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: keep up to 2 GiB of free heap top


def keep_freed_memory() -> bool:
    """Set the policy in this process (glibc only; a user's own MALLOC_* tuning is left as it is) →
    whether it was set."""
    if any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc, not musl: the same call, other constants  # noqa: B018
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def release_free_memory() -> None:
    """Hand the heap's free memory back to the OS now (glibc's malloc_trim: the top and every free page
    inside), where a command moves from one phase to a larger one and the freed blocks would not fit it."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
