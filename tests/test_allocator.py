"""The CLI's heap policy (lora2gguf.allocator): with it, a large block freed by a command is served from
the heap again, not a fresh mapping; a user's own MALLOC_* tuning is left alone. Each case runs in a fresh
interpreter, since the policy is process-wide."""

import json
import os
import subprocess
import sys

import pytest

# mallinfo2's hblkhd: bytes in mmapped blocks; a 24 MB malloc is one when glibc maps it, none when the heap
# serves it; a 48 MB one is mapped either way (over the policy's 32 MiB threshold)
PROBE = """
import ctypes, json, sys
from lora2gguf.allocator import keep_freed_memory, release_free_memory
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype, libc.malloc.restype, libc.free.argtypes = Info, ctypes.c_void_p, [ctypes.c_void_p]
set_ = keep_freed_memory() if sys.argv[1] == "policy" else None
before = libc.mallinfo2().hblkhd
p = libc.malloc(24 << 20)
mapped = libc.mallinfo2().hblkhd - before
libc.free(p)
kept = libc.mallinfo2().fordblks
big = libc.malloc(48 << 20)
big_mapped = libc.mallinfo2().hblkhd - before
libc.free(big)
release_free_memory()
print(json.dumps({"set": set_, "mapped": mapped, "kept": kept, "big_mapped": big_mapped,
                  "after_release": libc.mallinfo2().fordblks}))
"""


def probe(mode: str, **env) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=e, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_policy_serves_large_blocks_from_the_heap_and_keeps_them():
    plain, kept = probe("plain"), probe("policy")
    assert plain["mapped"] >= 24 << 20  # glibc's default: a fresh mapping, unmapped on free
    assert kept["set"] is True and kept["mapped"] == 0
    assert kept["kept"] >= 24 << 20  # freed, and still there for the next tensor
    assert kept["big_mapped"] >= 48 << 20  # the largest blocks still mapped: no holes left in the heap
    assert kept["after_release"] < 1 << 20  # release_free_memory hands it back


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_users_own_malloc_tuning_is_left_alone():
    r = probe("policy", MALLOC_ARENA_MAX="2")
    assert r["set"] is False and r["mapped"] >= 24 << 20


HUGEPAGE = """
import json, sys
from lora2gguf.allocator import keep_freed_memory
keep_freed_memory()
from numpy._core import multiarray
print(json.dumps(multiarray._get_madvise_hugepage()))
"""


@pytest.mark.parametrize("env, asked", [({}, False), ({"NUMPY_MADVISE_HUGEPAGE": "1"}, True)])
def test_numpy_arrays_in_small_pages_unless_the_user_says(env, asked):
    e = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"} | env
    out = subprocess.run([sys.executable, "-c", HUGEPAGE], capture_output=True, text=True, env=e, check=True)
    assert json.loads(out.stdout) is asked


def test_only_the_process_entry_sets_it(monkeypatch):
    import lora2gguf.cli as cli

    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(1))
    monkeypatch.setattr(sys, "argv", ["lora2gguf", "--version"])
    assert cli.main(["--version"]) == 0 and calls == []  # a program calling main(argv) keeps its own heap
    assert cli.main() == 0 and calls == [1]
