#!/usr/bin/env python3
"""Peak memory and extra disk of a command's whole process tree, with a watchdog that kills the tree.

Memory is PSS (/proc/PID/smaps_rollup) summed over the tree: each page is split among the processes
mapping it, so a GGUF mapped by the trainer and by llama.cpp's child counts once, and file pages count
while mapped (not while merely cached). RSS would count such a page once per process, and ru_maxrss is
one process's peak, never the tree's. Disk is the growth of the allocated bytes under the given
directories (du), with the filesystem's free-space drop (statvfs) as a cross-check that also sees
writes elsewhere, and other users' writes: it is noisy on a shared machine.

    python scripts/memwatch.py --self-check     # a child and a grandchild map one known file
    python scripts/memwatch.py [--limit-gb G] [--dir D] -- CMD...   # peak PSS, wall, extra disk of CMD
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

GB = 1e9


def children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:  # the process (or one thread) is gone: its children were reparented
        pass
    return out


def tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo += children(p)
    return pids


def pss(pid: int) -> tuple[int, int]:
    """(PSS, the part of it that is file pages, e.g. a mapped GGUF) in bytes; zeros for a process that is
    gone or a zombie."""
    total = file = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    total = int(line.split()[1]) * 1024
                elif line.startswith("Pss_File:"):
                    file = int(line.split()[1]) * 1024
    except OSError:
        pass
    return total, file


def du(path: Path) -> int:
    """Allocated bytes of the files under path (sparse files count what they use, as du does)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:  # renamed or removed between listing and stat
                pass
    return total


def free_bytes(path: Path) -> int:
    s = os.statvfs(path)
    return s.f_bavail * s.f_frsize


@dataclass
class Sample:
    t: float
    pss: int  # this sample's sum
    pss_file: int
    disk: int
    free_drop: int
    nproc: int
    held: int = 0  # the lower of this sum and the previous one: what peaks and the watchdog use


@dataclass
class Watch:
    """A sampler thread over the tree rooted at `pid`: peaks, a timeline, and a kill when the tree's PSS
    passes `limit` bytes or the filesystem of `dirs[0]` falls below `min_free` bytes free."""

    pid: int
    limit: float | None = None
    dirs: tuple[Path, ...] = ()
    min_free: float = 0
    interval: float = 0.05
    samples: list[Sample] = field(default_factory=list)
    killed: str | None = None  # why, when the watchdog killed the tree

    def __post_init__(self):
        self.t0 = time.perf_counter()
        self.free0 = free_bytes(self.dirs[0]) if self.dirs else 0
        self.disk0 = sum(du(d) for d in self.dirs)  # disk is counted as growth over this
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _loop(self):
        while not self._stop.is_set():
            t = time.perf_counter()
            pids = tree(self.pid)
            mem, mem_file = map(sum, zip(*(pss(p) for p in pids)))
            disk = sum(du(d) for d in self.dirs) - self.disk0
            free = free_bytes(self.dirs[0]) if self.dirs else 0
            s = Sample(time.perf_counter() - self.t0, mem, mem_file, disk, self.free0 - free if self.dirs else 0,
                       len(pids))
            # The processes are read one after another: a page that becomes shared between two reads counts
            # in full in the first and half in the second, so a sum can overshoot for one sample (by 200 MB
            # in the self-check on a loaded machine). A level held over two samples (~0.1 s) cannot.
            s.held = min(mem, self.samples[-1].pss) if self.samples else mem
            self.samples.append(s)
            if self.killed is None:
                if self.limit is not None and s.held > self.limit:
                    self.killed = f"PSS {s.held / GB:.3f} GB > limit {self.limit / GB:.3f} GB after {s.t:.1f} s"
                elif self.dirs and free < self.min_free:
                    self.killed = f"free disk {free / GB:.1f} GB < {self.min_free / GB:.1f} GB after {s.t:.0f} s"
                if self.killed:
                    kill_tree(self.pid, pids)
            # reading /proc takes time too: smaps_rollup walks the page tables of every mapping (tens of ms
            # for a mapped 5 GB GGUF), so wait at least 3× that, or the sampler takes a core from the command
            spent = time.perf_counter() - t
            self._stop.wait(max(self.interval - spent, 3 * spent))

    def peak(self, key: str = "held") -> int:
        return max((getattr(s, key) for s in self.samples), default=0)

    def top(self) -> Sample | None:
        """The sample of the peak PSS."""
        return max(self.samples, key=lambda s: s.held, default=None)

    def timeline(self, every: float = 1.0) -> list[list[float]]:
        """[t s, PSS GB, file-page part of it GB, disk GB] about once per `every` seconds, plus the peak
        sample: for the JSON."""
        out, next_t, top = [], 0.0, self.top()
        for s in self.samples:
            if s.t >= next_t or s is top:
                out.append([round(s.t, 2), round(s.held / GB, 3), round(s.pss_file / GB, 3), round(s.disk / GB, 3)])
                next_t = s.t + every
        return out


def kill_tree(root: int, pids: list[int]) -> None:
    """SIGKILL the command's process group (it was started in its own session) and every process seen in
    its tree, in case one left the group."""
    try:
        os.killpg(root, signal.SIGKILL)
    except OSError:
        pass
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


@dataclass
class Result:
    rc: int
    wall_s: float
    peak_pss: int
    peak_disk: int
    peak_free_drop: int
    killed: str | None
    watch: Watch


def run(cmd: list[str], limit: float | None = None, dirs: tuple[Path, ...] = (), min_free: float = 0,
        env: dict | None = None, log: Path | TextIO | None = None, interval: float = 0.05) -> Result:
    """Run cmd to completion (or to the watchdog's kill) under a Watch. Its output goes to `log`, each
    line (or progress-bar update) stamped with the seconds since the start and the tree's PSS then, to
    see which phase the memory belongs to."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                         start_new_session=True)
    to_file = log is None or isinstance(log, Path)
    with Watch(p.pid, limit, tuple(dirs), min_free, interval) as w, \
            (open(log or os.devnull, "w") if to_file else contextlib.nullcontext(log)) as out:
        rest = ""  # a line split across two reads
        for chunk in iter(lambda: os.read(p.stdout.fileno(), 1 << 16), b""):
            now = w.samples[-1] if w.samples else Sample(0, 0, 0, 0, 0, 0)
            *lines, rest = (rest + chunk.decode(errors="replace")).replace("\r", "\n").split("\n")
            for line in lines:
                if line.strip():
                    out.write(f"[{time.perf_counter() - t:7.1f} s {now.held / GB:6.2f} GB, "
                              f"file {now.pss_file / GB:5.2f}] {line}\n")
            out.flush()
        if rest.strip():
            out.write(f"[{time.perf_counter() - t:7.1f} s] {rest}\n")
        rc = p.wait()
        wall = time.perf_counter() - t
    p.stdout.close()
    return Result(rc, wall, w.peak(), w.peak("disk"), w.peak("free_drop"), w.killed, w)


# -- self-check -------------------------------------------------------------------------------------
# A child maps a FILE_MB file and reads every page, allocates ANON_MB and writes it, then starts a
# grandchild that maps and reads the same file. Expected tree PSS: file once + anon + two interpreters.
CHILD = """
import mmap, subprocess, sys, time
path, anon_mb, me = sys.argv[1], int(sys.argv[2]), sys.argv[3]
f = open(path, "rb"); m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
s = sum(m[i] for i in range(0, len(m), 4096))  # touch every page of the file
a = bytearray(anon_mb << 20)
for i in range(0, len(a), 4096): a[i] = 1  # bytearray is calloc'd: write to make the pages real
if me:  # the grandchild: same file, no anon, no further child
    subprocess.run([sys.executable, "-c", me, path, "0", ""])
else:
    time.sleep(1.5)
"""


def self_check(file_mb: int = 512, anon_mb: int = 256) -> None:
    import tempfile

    with tempfile.TemporaryDirectory(dir=Path.home()) as d:
        d = Path(d)
        f = d / "known.bin"
        with open(f, "wb") as fh:
            for _ in range(file_mb):
                fh.write(os.urandom(1 << 20))
        cmd = [sys.executable, "-c", CHILD, str(f), str(anon_mb), CHILD]
        # baseline: one bare interpreter's PSS
        bare = run([sys.executable, "-c", "import time; time.sleep(1)"])
        r = run(cmd)
        MiB, want = 2**20, (file_mb + anon_mb) * 2**20
        extra, top = r.peak_pss - want, r.watch.top()
        print(f"bare interpreter: {bare.peak_pss / MiB:.0f} MiB PSS")
        print(f"child maps a {file_mb} MiB file and writes {anon_mb} MiB, grandchild maps the same file: peak "
              f"tree PSS {r.peak_pss / MiB:.0f} MiB = expected {want / MiB:.0f} + {extra / MiB:.0f} (two interpreters "
              f"≈ {2 * bare.peak_pss / MiB:.0f}), of which file pages {top.pss_file / MiB:.0f} MiB (the file once "
              f"+ the interpreters'); max processes seen {max(s.nproc for s in r.watch.samples)}; largest single "
              f"sample {r.watch.peak('pss') / MiB:.0f} MiB")
        assert 0 <= top.pss_file - file_mb * 2**20 < 16 * 2**20, "the shared file is not counted once"
        assert 0 <= extra < 2 * bare.peak_pss + 32 * 2**20, "tree PSS is not file once + anon + interpreters"
        assert max(s.nproc for s in r.watch.samples) == 2, "the grandchild was not seen"
        k = run(cmd, limit=(file_mb // 2) * 2**20)
        print(f"with a {file_mb // 2} MiB limit: killed={k.killed!r}, rc {k.rc}, after {k.wall_s:.1f} s")
        assert k.killed and k.rc == -signal.SIGKILL
        w = d / "scratch"
        w.mkdir()
        write = f"import os, time; open('{w}/x', 'wb').write(os.urandom(64 << 20)); time.sleep(0.5); os.remove('{w}/x')"
        r = run([sys.executable, "-c", write], dirs=(w,))
        print(f"a child writes then removes 64 MiB: peak extra disk {r.peak_disk / MiB:.1f} MiB (du), free-space drop "
              f"{r.peak_free_drop / MiB:.1f} MiB")
        assert abs(r.peak_disk - 64 * MiB) < MiB
        print("ok")


def main() -> None:
    import argparse
    import json

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--self-check", action="store_true")
    ap.add_argument("--limit-gb", type=float, help="Kill the tree above this PSS.")
    ap.add_argument("--dir", type=Path, action="append", default=[], help="Count disk used under this directory.")
    ap.add_argument("cmd", nargs="*")
    a = ap.parse_args()
    if a.self_check:
        return self_check()
    r = run(a.cmd, a.limit_gb * GB if a.limit_gb else None, tuple(a.dir), log=sys.stderr)
    top = r.watch.top()
    print(json.dumps({"rc": r.rc, "wall_s": round(r.wall_s, 1), "peak_pss_gb": round(r.peak_pss / GB, 3),
                      "peak_pss_file_gb": round(top.pss_file / GB, 3) if top else 0,
                      "peak_disk_gb": round(r.peak_disk / GB, 3),
                      "peak_free_drop_gb": round(r.peak_free_drop / GB, 3), "killed": r.killed}))


if __name__ == "__main__":
    main()
