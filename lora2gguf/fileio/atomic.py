"""Outputs that appear whole or not at all: checked before any work (never over an input, never over an
existing file without --force), written to a temp name beside the target (carrying the writer's pid, so a
later run can remove a dead writer's leftovers), flushed to disk, given the umask's ordinary mode and
renamed into place."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from lora2gguf.errors import Lora2GGUFError


def check_output(out: str | os.PathLike, force: bool, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Validate an output path before any heavy work."""
    out = Path(out)
    if not out.parent.is_dir():
        what = "is not a directory" if out.parent.exists() else "does not exist"
        raise Lora2GGUFError(f"{out}: directory {out.parent} {what}; create it first")
    for i in inputs:
        if Path(i).exists() and out.exists() and (out.resolve() == Path(i).resolve() or os.path.samefile(out, i)):
            raise Lora2GGUFError(f"{out}: the output path is also an input ({i}); choose another output path")
    if out.exists() and not force:
        raise Lora2GGUFError(f"{out}: already exists; pass --force to overwrite it")
    if out.is_dir():
        raise Lora2GGUFError(f"{out}: is a directory; give a file path")
    return out


def umask_mode(directory: bool = False) -> int:
    """The mode an ordinary new file (directory) gets under this process's umask: 0644 (0755) under 022.
    mkstemp/mkdtemp make theirs 0600/0700, which a server running as another user (llama-server, Ollama)
    cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def fsync_path(path: Path) -> None:
    """Flush a written file (or a directory's entries) to disk, so a crash after the rename cannot leave
    the new name on an empty or partial file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def part_prefix(out: Path) -> str:
    """Temp names beside `out` carry the writer's pid: `.NAME.<pid>.XXXX.part`, so a later run can tell
    a dead writer's leftovers (SIGKILL runs no clean-up) from a live one's."""
    return f".{out.name}.{os.getpid()}."


def remove_stale_parts(out: Path) -> list[Path]:
    """Remove temp files and directories beside `out` left by writers that no longer run."""
    removed = []
    parent = out.parent if str(out.parent) else Path(".")
    for p in parent.glob(f".{glob.escape(out.name)}.*.part"):
        pid = p.name[len(out.name) + 2:].split(".", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def atomic_output(out: Path) -> Iterator[Path]:
    """Yield a temp path beside `out`; on success flush it to disk, give it the umask's ordinary mode
    and rename it over `out`; on any failure remove it. A dead writer's leftovers are removed first."""
    remove_stale_parts(out)
    fd, tmp = tempfile.mkstemp(prefix=part_prefix(out), suffix=".part", dir=out.parent or ".")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, umask_mode())
        fsync_path(tmp_path)
        os.replace(tmp_path, out)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def check_output_dir(out: Path, force: bool, inputs: list[Path]) -> None:
    if not out.parent.is_dir():
        raise Lora2GGUFError(f"{out}: directory {out.parent} does not exist; create it first")
    for i in inputs:
        if i.exists() and (i.resolve() == out.resolve() or out.resolve() in i.resolve().parents):
            raise Lora2GGUFError(f"{out}: the output directory holds an input ({i}); choose another output path")
    if out.exists():
        if not force:
            raise Lora2GGUFError(f"{out}: already exists; pass --force to replace it")
        if not out.is_dir() or (any(out.iterdir()) and not (out / "adapter_config.json").is_file()):
            raise Lora2GGUFError(f"{out}: exists and is not an adapter directory; refusing to replace it")
