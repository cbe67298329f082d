"""A folder held by one writer at a time: ``.ftpipe.lock`` in it, locked with ``flock`` while a run writes.

The lock file says who holds it (pid, host, command, since when); a second writer gets a message
naming the holder. The operating system drops the lock when the holder's process ends, however it
ends (``kill -9`` included), so a stale lock file never blocks the next run. A process that already
holds a folder's lock may take it again (the count is kept per process).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from ftpipe.errors import FtpipeError

LOCK_FILE = ".ftpipe.lock"
_held: dict[str, tuple[int, int]] = {}  # resolved lock path -> (fd, count)


class FolderBusy(FtpipeError):
    """Another ftpipe process is writing the folder."""


def _holder(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def acquire(folder: Path, field: str, what: str = "") -> Path:
    """Take the lock of ``folder`` (created when missing) for this process; FolderBusy when another process
    holds it. Returns the lock file's path (give it to :func:`release`)."""
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    path = (folder / LOCK_FILE).resolve()
    key = str(path)
    if key in _held:
        fd, count = _held[key]
        _held[key] = (fd, count + 1)
        return path
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = _holder(path)
        who = (
            f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('since', '?')}: "
            f"{holder.get('command', '?')}"
            if holder
            else "another process"
        )
        raise FolderBusy(
            f"{field}: {folder} is being written by another ftpipe run ({who}). Wait for it to end, or give "
            f"this one another {field}"
        ) from None
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300],
        "what": what,
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    _held[key] = (fd, 1)
    return path


def release(path: Path) -> None:
    """Give back one hold of the lock ``path`` (from :func:`acquire`); the last one unlocks it."""
    key = str(path)
    if key not in _held:
        return
    fd, count = _held[key]
    if count > 1:
        _held[key] = (fd, count - 1)
        return
    del _held[key]
    try:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def release_all() -> None:
    """Give back every lock of this process (a training process hands over to export and evaluation)."""
    for key in list(_held):
        _held[key] = (_held[key][0], 1)
        release(Path(key))
