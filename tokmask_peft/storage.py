"""Files that are whole or absent, and directories one process writes at a time.

Every file a run writes goes through a temporary file in the same directory, fsync, then a rename:
a full disk or a kill leaves the old file or none, never a half-written one that parses as a result.

A sweep or a run holds ``DIR/.tokmask.lock`` (``filelock``: an ``flock`` the kernel releases when the
process dies, so a lock left by ``kill -9`` never blocks) and names its holder (host, pid, command) in
``DIR/.tokmask.lock.owner`` for the refusal a second writer gets; both files go when it lets go.
``flock`` holds between processes of one machine and, on Linux, over NFS v4 (emulated with byte-range
locks); on file systems without it (some CIFS or Lustre mounts) the lock cannot guard: give each
machine its own output directory.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock, Timeout

LOCK_FILE = ".tokmask.lock"
OWNER_FILE = ".tokmask.lock.owner"


def current_umask() -> int:
    """The process's umask (Linux reports it; elsewhere it is read by setting it and back)."""
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("Umask:"))
        return int(line.split()[1], 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all (temp file, fsync, rename, directory fsync), with the
    mode an ordinary write would give it (mkstemp's 0600 would hide a shared sweep's results from others)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str, allow_nan=False) + "\n")


def read_json(path: str | Path, what: str = "file") -> Any:
    """JSON from ``path``; an unreadable or half-written file is an error naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: this {what} is not valid JSON ({e}); it was cut short or damaged") from None


def move_files_in(source: Path, target: Path) -> None:
    """Rename every file of ``source`` (written there in full, e.g. by ``save_pretrained``) into
    ``target`` one by one, each rename atomic, then remove ``source``."""
    for item in sorted(source.iterdir()):
        with open(item, "rb") as f:
            os.fsync(f.fileno())
        os.replace(item, target / item.name)
    source.rmdir()
    _fsync_dir(target)


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirectoryInUse(RuntimeError):
    """Another live process is writing this directory."""


@contextlib.contextmanager
def hold(directory: str | Path, what: str = "directory") -> Iterator[None]:
    """Hold ``directory`` for this process, or refuse at once naming the process that holds it."""
    directory = Path(directory)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    lock = FileLock(directory / LOCK_FILE, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise DirectoryInUse(f"{directory} is in use by another {what} ({_holder(directory)}); wait for it to "
                             "finish or stop it, or write to another directory") from None
    except PermissionError as e:
        raise PermissionError(f"{directory} is not writable ({e.strerror}): a {what} writes its files there; "
                              "choose a directory you can write to") from None
    try:
        write_json(directory / OWNER_FILE, {"host": socket.gethostname(), "pid": os.getpid(),
                                            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                                            "command": " ".join(sys.argv)[:300]})
        yield
    finally:
        # Unlinked while still held: filelock (>= 4) checks after each flock that the path still names the
        # locked file, so a process that opened the old one retries instead of sharing it.
        for name in (OWNER_FILE, LOCK_FILE):
            with contextlib.suppress(OSError):  # gone, or a read-only directory: never hide the block's own error
                (directory / name).unlink()
        with contextlib.suppress(OSError):
            lock.release()
        if created and not any(directory.iterdir()):
            with contextlib.suppress(OSError):
                directory.rmdir()  # refused before writing anything: leave no trace of the attempt


def _holder(directory: Path) -> str:
    try:
        owner = read_json(directory / OWNER_FILE)
        return f"host {owner['host']}, pid {owner['pid']}, since {owner['since']}: {owner['command']}"
    except (OSError, ValueError, KeyError):
        return "holder not recorded yet"
