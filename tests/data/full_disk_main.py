"""Prepare twice into a small tmpfs, the second time from a source too large for it; used by
test_prepared_identity.py.

Usage (in a new mount namespace, as root): ``unshare -m python full_disk_main.py MOUNT SOURCE RESULT``.
Mounts a 512 KiB tmpfs on MOUNT, runs ``ftpipe prepare`` (a real process) into ``MOUNT/d``, hashes the
prepared files, grows SOURCE past the tmpfs, runs it again and writes what it saw to RESULT (JSON).
Exits 3 when the tmpfs cannot be mounted.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path


def rows(n: int, pad: int) -> str:
    return "".join(
        json.dumps({"instruction": f"Say {i}. " + "x" * pad, "input": "", "output": f"Hi {i}."}) + "\n"
        for i in range(n)
    )


def files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def prepare(source: Path, data_dir: Path) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "ftpipe", "prepare", "--dataset", str(source), "--data_dir", str(data_dir)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300)


def main() -> None:
    mount, source, result = (Path(a) for a in sys.argv[1:4])
    mount.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)]).returncode:
        sys.exit(3)
    source.write_text(rows(50, 0))
    first = prepare(source, mount / "d")
    before = files(mount / "d")
    source.write_text(rows(20000, 80))  # about 2.5 MB of rows: more than the tmpfs holds
    second = prepare(source, mount / "d")
    result.write_text(
        json.dumps(
            {
                "first": [first.returncode, first.stdout + first.stderr],
                "second": [second.returncode, second.stdout + second.stderr],
                "before": before,
                "after": files(mount / "d"),
                "entries": sorted(str(p.relative_to(mount)) for p in mount.rglob("*")),
            }
        )
    )


if __name__ == "__main__":
    main()
