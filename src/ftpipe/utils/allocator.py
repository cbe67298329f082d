"""glibc malloc settings that keep a CPU training process's memory from fragmenting.

PyTorch allocates CPU tensors with ``posix_memalign``. glibc serves an aligned request by carving it out
of a larger chunk and freeing the few spare bytes on either side, which land in the per-thread cache
(tcache) or the fast bins. Chunks there count as in use, so when the activations of a step are freed
they cannot merge across them, and the next step's (same-sized) aligned requests no longer fit the holes:
the heap grows instead. Training the benchmark's LoRA on the embedded model (2 x 256 tokens a
micro-batch), a process held 1.5 GiB of free heap it could not reuse and peaked at 3.2 GiB resident
where 2.5 GiB were live. With the tcache and the fast bins off the spare bytes merge at once: the peak
fell to 2.6 GiB, and a step was no slower (small allocations of the step are few next to its matmuls).

The settings are glibc *tunables*, read once when a process starts, so :func:`reexec_with_tunables` runs
the command again in the same process (``execve``, same PID) with them in ``GLIBC_TUNABLES``; the
processes it starts (Lightning's ranks, data workers) inherit them. Nothing happens off Linux, without
glibc, when the user set either tunable themselves, or with ``FTPIPE_DEFAULT_MALLOC=1``.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping, Sequence

#: The tunables, in ``GLIBC_TUNABLES`` syntax: no per-thread cache, no fast bins.
TUNABLES = ("glibc.malloc.tcache_count=0", "glibc.malloc.mxfast=0")
#: Environment variable that keeps glibc's default malloc settings when set to 1.
OPT_OUT = "FTPIPE_DEFAULT_MALLOC"


def uses_glibc() -> bool:
    """Linux with the GNU C library (where the tunables exist)."""
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def tunables_env(environ: Mapping[str, str], *, glibc: bool | None = None) -> dict[str, str] | None:
    """``environ`` with :data:`TUNABLES` added to ``GLIBC_TUNABLES``, or None when nothing is to change
    (not glibc, opted out, already set, or the user chose a value for either tunable)."""
    if not (uses_glibc() if glibc is None else glibc) or environ.get(OPT_OUT) == "1":
        return None
    current = [item for item in environ.get("GLIBC_TUNABLES", "").split(":") if item]
    names = {item.split("=", 1)[0] for item in current}
    missing = [t for t in TUNABLES if t.split("=", 1)[0] not in names]
    if len(missing) < len(TUNABLES):  # set already, or the user chose one of them: theirs stands
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join([*current, *missing])}


def active(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process started with ftpipe's malloc tunables."""
    env = os.environ if environ is None else environ
    items = set(env.get("GLIBC_TUNABLES", "").split(":"))
    return uses_glibc() and all(t in items for t in TUNABLES)


def describe(environ: Mapping[str, str] | None = None) -> str:
    """One phrase for the run's log: which malloc settings this process runs with."""
    if not uses_glibc():
        return "the platform's malloc"
    if active(environ):
        return "glibc malloc without tcache and fast bins"
    return (
        f"glibc malloc defaults (the ftpipe command without {OPT_OUT}=1 turns tcache and fast bins off: "
        "less fragmentation)"
    )


def reexec_with_tunables(orig_argv: Sequence[str] | None = None) -> None:
    """Replace this process by the same command line with :data:`TUNABLES` in its environment (returns
    only when nothing is to change). Call it first thing in a console entry point, never in a library
    call: the process starts over."""
    env = tunables_env(os.environ)
    argv = list(sys.orig_argv if orig_argv is None else orig_argv)
    if env is None or not argv:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv[1:]], env)
