"""The glibc malloc tunables of ftpipe's console commands: when they are added, kept or left alone, and
that the command really starts over with them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ftpipe.utils import allocator
from ftpipe.utils.allocator import OPT_OUT, TUNABLES, reexec_with_tunables, tunables_env

OURS = ":".join(TUNABLES)


@pytest.mark.timeout(30)
def test_tunables_added_merged_or_left_alone():
    assert tunables_env({"PATH": "/bin"}, glibc=True) == {"PATH": "/bin", "GLIBC_TUNABLES": OURS}
    # other tunables of the user are kept, ours appended
    merged = tunables_env({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F"}, glibc=True)
    assert merged == {"GLIBC_TUNABLES": f"glibc.cpu.hwcaps=-AVX512F:{OURS}"}
    assert tunables_env({}, glibc=False) is None  # musl, macOS, Windows: nothing to do
    assert tunables_env({OPT_OUT: "1"}, glibc=True) is None
    assert tunables_env({"GLIBC_TUNABLES": OURS}, glibc=True) is None  # already started with them
    # the user's own choice for either tunable stands
    assert tunables_env({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=7"}, glibc=True) is None


@pytest.mark.timeout(30)
def test_reexec_runs_the_same_command_line_with_the_tunables(monkeypatch):
    calls = []
    monkeypatch.setattr(allocator, "uses_glibc", lambda: True)
    monkeypatch.setattr(os, "execve", lambda path, args, env: calls.append((path, args, env)))
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv(OPT_OUT, raising=False)
    reexec_with_tunables(["python3", "-X", "utf8", "-m", "ftpipe", "train", "--config", "c.yaml"])
    ((path, args, env),) = calls
    assert path == sys.executable
    assert args == [sys.executable, "-X", "utf8", "-m", "ftpipe", "train", "--config", "c.yaml"]
    assert env["GLIBC_TUNABLES"] == OURS
    monkeypatch.setenv("GLIBC_TUNABLES", OURS)
    reexec_with_tunables(["python3", "-m", "ftpipe", "train"])
    assert len(calls) == 1  # started with them already: no second start


@pytest.mark.timeout(60)
@pytest.mark.skipif(not allocator.uses_glibc(), reason="glibc only")
def test_a_process_starts_over_once_with_the_tunables():
    code = (
        "import os, sys; print('start', flush=True)\n"
        "from ftpipe.utils.allocator import active, reexec_with_tunables\n"
        "reexec_with_tunables(); print(os.environ['GLIBC_TUNABLES'], active())"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", OPT_OUT)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=50, check=True
    ).stdout.split("\n")
    assert out[:3] == ["start", "start", f"{OURS} True"]  # one more start, then on with the tunables
