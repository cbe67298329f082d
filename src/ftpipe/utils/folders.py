"""Replacing a whole output folder so that a failure or a ``kill -9`` at any point leaves the previous one whole.

The new folder is written under a staging name beside the target (``.<name>.tmp-<pid>``) and swapped
in only when complete: on Linux with one atomic ``renameat2(RENAME_EXCHANGE)``, elsewhere with two
renames whose one-instant gap :func:`recover` closes at the next start (the previous folder waits
under ``.<name>.old-<pid>`` and is put back). Staging folders of processes that are gone are removed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
from pathlib import Path

from ftpipe.utils.logging import get_logger

log = get_logger(__name__)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def staging_dir(target: Path) -> Path:
    """The staging folder of this process for ``target``."""
    return target.parent / f".{target.name}.tmp-{os.getpid()}"


def _old_dir(target: Path) -> Path:
    return target.parent / f".{target.name}.old-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(target: Path, kind: str) -> list[tuple[Path, int]]:
    found = []
    for path in target.parent.glob(f".{target.name}.{kind}-*"):
        tail = path.name.rsplit("-", 1)[-1]
        if tail.isdigit():
            found.append((path, int(tail)))
    return found


def recover(target: Path) -> None:
    """Undo what an interrupted swap left: put a set-aside previous folder back when the target is missing,
    and remove the staging and set-aside folders of processes that are gone."""
    if not target.parent.is_dir():
        return
    for old, pid in _leftovers(target, "old"):
        if _pid_alive(pid) and pid != os.getpid():
            continue
        if not target.exists():
            os.replace(old, target)
            log.warning("restored %s from %s (an earlier replacement was interrupted)", target, old.name)
        else:
            shutil.rmtree(old, ignore_errors=True)
    for tmp, pid in _leftovers(target, "tmp"):
        if pid == os.getpid() or not _pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)
            log.info("removed %s, left by an interrupted run", tmp)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux ``renameat2``); False where the system cannot."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _umask() -> int:
    """The process's umask: read on Linux (setting it to read it would race with other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask_modes(folder: Path) -> None:
    """Give ``folder`` and everything in it the modes the umask gives new files and folders (0644 / 0755
    under umask 022; executables keep their execute bits): some writers (safetensors) make files 0600."""
    mask = _umask()
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in dirs:  # symbolic links to folders are not walked: leave them
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o777 & ~mask)
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path):
                continue
            executable = os.stat(path).st_mode & 0o111
            os.chmod(path, (0o777 if executable else 0o666) & ~mask)


def swap_in(staging: Path, target: Path) -> None:
    """Put the complete ``staging`` folder in ``target``'s place (with the umask's modes, see
    :func:`apply_umask_modes`); the previous ``target`` (if any) goes."""
    apply_umask_modes(staging)
    if not target.exists():
        os.replace(staging, target)
        return
    if _exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # now holds the previous folder
        return
    old = _old_dir(target)
    os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)
