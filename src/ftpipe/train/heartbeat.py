"""Which rank hung or died: per-rank heartbeats in the process group's key-value store.

Every collective has the process group's timeout (``process_group_timeout_s``): a rank that stops
responding makes the others fail instead of waiting forever. To say *which* rank stopped, each rank
records its step in the store once per optimizer step (``ftpipe/heartbeat/<rank>``; one small write
to the TCP store that the launcher already runs). When a collective times out, every rank that saw the
timeout marks itself in the store (``ftpipe/timed_out/<rank>``) and waits briefly for the others: the
ranks that never mark themselves are the ones that stopped responding, and the message names them with
their last step.

When a peer process dies (killed, out of memory, its node lost), the survivors' next collective fails with
a closed connection. Every rank records who it is at the start of training (``ftpipe/rank/<rank>``: node,
host, pid, its log file) and keeps everyone's record; a survivor then marks itself in the store like after
a timeout, and the ranks that never mark themselves (or rank 0, when the store it serves is gone) are named
with their node, host and log.

Fault injection for tests: ``hang_rank`` / ``hang_at_step`` (the ``debug`` section) make that rank stop
responding (sleep) at that step.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from ftpipe.compat import default_store
from ftpipe.errors import FtpipeError
from ftpipe.train.faults import NO_FAULTS, Faults
from ftpipe.train.step import OptimizerStep
from ftpipe.utils.logging import get_logger
from ftpipe.utils.world import distributed
from ftpipe.utils.world import world as this_world

log = get_logger(__name__)

KEY = "ftpipe/heartbeat/{rank}"
RANK_KEY = "ftpipe/rank/{rank}"
TIMED_OUT_KEY = "ftpipe/timed_out/{rank}"
#: How long a rank that saw a timeout waits for the others to report theirs.
MARK_WAIT_S = 10.0
#: The same wait when a peer's connection closed (its process is gone: the survivors mark at once).
PEER_WAIT_S = 3.0


class CollectiveTimeoutError(FtpipeError):
    """A collective operation timed out: another rank stopped responding."""


class PeerLostError(FtpipeError):
    """Another rank's process ended in the middle of training; the message names it and its log."""


#: What torch says when a peer's connection closed (gloo, NCCL, the TCP store).
PEER_LOST = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "remote process exited",
    "ncclremoteerror",
    "socket closed",
    "connection refused",
)


def is_peer_lost(err: BaseException) -> bool:
    """Whether ``err`` says that another process of the job went away."""
    text = str(err).lower()
    return isinstance(err, RuntimeError | ConnectionError) and any(s in text for s in PEER_LOST)


def _store() -> Any | None:
    return default_store() if distributed() else None


class Heartbeat(Callback):
    """Records this rank's step in the store once per optimizer step (at its first batch)."""

    def __init__(self, steps: OptimizerStep, faults: Faults = NO_FAULTS) -> None:
        super().__init__()
        self.steps = steps
        self.faults = faults
        #: every rank's record (``{"node", "host", "pid", "log"}``), read at the start of training
        self.peers: dict[int, dict[str, Any]] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.peers = register_ranks(trainer.global_rank, trainer.world_size)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        store = _store()
        if store is not None and self.steps.starts_step():  # once per optimizer step, at its first batch
            store.set(KEY.format(rank=trainer.global_rank), f"{trainer.global_step} {time.time():.0f}")
        self.faults.maybe_hang(trainer.global_rank, trainer.global_step + 1)


def register_ranks(rank: int, world_size: int, wait_s: float = 60.0) -> dict[int, dict[str, Any]]:
    """Record who this rank is in the store and read every rank's record (empty without a store)."""
    import json
    import os

    from ftpipe.utils.launch import current
    from ftpipe.utils.logging import current_log_file

    store = _store()
    if store is None:
        return {}
    launch = current()
    log_file = current_log_file()
    own = {"node": launch.node_rank, "host": launch.host, "pid": os.getpid(), "log": str(log_file or "")}
    store.set(RANK_KEY.format(rank=rank), json.dumps(own))
    keys = [RANK_KEY.format(rank=r) for r in range(world_size)]
    try:
        store.wait(keys, timedelta(seconds=wait_s))
        return {r: json.loads(store.get(k).decode()) for r, k in enumerate(keys)}
    except (RuntimeError, ValueError):  # a record missing is no reason to fail training
        return {rank: own}


def _describe_rank(rank: int, peers: dict[int, dict[str, Any]]) -> tuple[str, str]:
    """(``rank R (node, host, pid)``, where its log is) of a rank's record."""
    peer = peers.get(rank)
    if not peer:
        return f"rank {rank}", ""
    where = f"rank {rank} (node {peer['node']}, host {peer['host']}, pid {peer['pid']})"
    log = f"rank {rank}'s log: {peer['log']} on {peer['host']}. " if peer.get("log") else ""
    return where, log


def peer_lost_error(err: BaseException, peers: dict[int, dict[str, Any]], step: int) -> PeerLostError:
    """The user's message when a collective failed because another rank's process went away."""
    rank, world = this_world()
    if world == 2:  # the other one
        silent: list[int] | None = [1 - rank]
    else:  # quickly: a launcher may end the survivors soon (Lightning's after at most 5 s)
        silent = unresponsive_ranks(rank, world, wait_s=PEER_WAIT_S)
    if silent is None:  # the store is gone: rank 0 serves it
        silent = [0] if rank != 0 else []
    gone = [_describe_rank(r, peers) for r in silent if r != rank]
    who = ", ".join(w for w, _ in gone) if gone else "another rank"
    logs = "".join(log for _, log in gone)
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    when = f"during step {step + 1}" if peers else "before training started (preparing the data or the model)"
    return PeerLostError(
        f"rank {rank}: {who} stopped {when}: its connection to this rank closed. {logs or 'Its own log says why. '}Look "
        "at that log (a process killed by the system, out of memory for one, ends it without an error) and "
        "at that machine; then run the same command with --resume_from_checkpoint auto to continue from the "
        f"last checkpoint. Torch said: {first_line[:300]}"
    )


def _read(store: Any, key: str) -> str | None:
    try:
        return store.get(key).decode() if store.check([key]) else None
    except (RuntimeError, ValueError):
        return None


def heartbeats(world_size: int) -> dict[int, tuple[int, float]]:
    """``{rank: (step, unix time)}`` of the ranks that recorded one (empty without a store)."""
    store = _store()
    if store is None:
        return {}
    store.set_timeout(timedelta(seconds=5))
    found = {}
    for rank in range(world_size):
        value = _read(store, KEY.format(rank=rank))
        if value:
            step, stamp = value.split()
            found[rank] = (int(step), float(stamp))
    return found


def unresponsive_ranks(rank: int, world_size: int, wait_s: float = MARK_WAIT_S) -> list[int] | None:
    """Mark this rank as having seen a timeout and wait up to ``wait_s`` for the others; the ranks that
    did not mark themselves stopped responding (None without a store)."""
    store = _store()
    if store is None:
        return None
    store.set_timeout(timedelta(seconds=5))
    try:
        store.set(TIMED_OUT_KEY.format(rank=rank), "1")
    except RuntimeError:
        return None
    others = [r for r in range(world_size) if r != rank]
    deadline = time.monotonic() + wait_s
    while True:
        silent = [r for r in others if _read(store, TIMED_OUT_KEY.format(rank=r)) is None]
        if not silent or time.monotonic() >= deadline:
            return silent
        time.sleep(0.5)


def is_timeout(err: BaseException) -> bool:
    """A collective's timeout (gloo, NCCL), as torch reports it."""
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("timed out" in text or "timeout" in text)


def timeout_error(err: BaseException, timeout_s: float) -> CollectiveTimeoutError:
    """The user's message for a collective timeout: which ranks stopped responding, and what to do."""
    rank, world = this_world()
    silent = unresponsive_ranks(rank, world)
    beats = heartbeats(world)
    now = time.time()
    states = ", ".join(
        f"rank {r}: step {beats[r][0] + 1}, last seen {now - beats[r][1]:.0f} s ago"
        if r in beats
        else f"rank {r}: -"
        for r in range(world)
    )
    culprit = (
        f"rank(s) {', '.join(map(str, silent))} stopped responding"
        if silent
        else "another rank stopped responding"
    )
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return CollectiveTimeoutError(
        f"rank {rank}: a collective operation timed out after process_group_timeout_s={timeout_s:g} s: "
        f"{culprit} ({states or 'no heartbeats'}). Check that rank's log and machine (killed, out of "
        "memory, stuck in I/O); raise process_group_timeout_s if a step legitimately takes longer. "
        f"Torch said: {first_line[:300]}"
    )
