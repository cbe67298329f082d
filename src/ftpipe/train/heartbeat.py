"""Which rank hung: per-rank heartbeats in the process group's key-value store.

Every collective has the process group's timeout (``process_group_timeout_s``): a rank that stops
responding makes the others fail instead of waiting forever. To say *which* rank stopped, each rank
records its step in the store once per optimizer step (``ftpipe/heartbeat/<rank>``; one small write
to the TCP store that the launcher already runs). When a collective times out, every rank that saw the
timeout marks itself in the store (``ftpipe/timed_out/<rank>``) and waits briefly for the others: the
ranks that never mark themselves are the ones that stopped responding, and the message names them with
their last step.

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
TIMED_OUT_KEY = "ftpipe/timed_out/{rank}"
#: How long a rank that saw a timeout waits for the others to report theirs.
MARK_WAIT_S = 10.0


class CollectiveTimeoutError(FtpipeError):
    """A collective operation timed out: another rank stopped responding."""


def _store() -> Any | None:
    return default_store() if distributed() else None


class Heartbeat(Callback):
    """Records this rank's step in the store once per optimizer step (at its first batch)."""

    def __init__(self, steps: OptimizerStep, faults: Faults = NO_FAULTS) -> None:
        super().__init__()
        self.steps = steps
        self.faults = faults

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        store = _store()
        if store is not None and self.steps.starts_step():  # once per optimizer step, at its first batch
            store.set(KEY.format(rank=trainer.global_rank), f"{trainer.global_step} {time.time():.0f}")
        self.faults.maybe_hang(trainer.global_rank, trainer.global_step + 1)


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
