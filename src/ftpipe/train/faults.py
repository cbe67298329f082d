"""Fault injection for the tests of ftpipe's failure handling, in one place.

The ``debug`` section of the configuration (:class:`ftpipe.config.schema.DebugConfig`, in the spirit of
torchtitan's ``DebugConfig``) is parsed and validated once with the rest of the configuration;
:class:`Faults` turns it into the few hooks that training calls, and is handed to each part that needs
one (the module, the stop and heartbeat callbacks, the checkpoint saver). Nothing here reads the
environment: a test sets ``--stop_at_step 3`` like any other field, and a real run injects nothing.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from ftpipe.config.schema import DebugConfig
from ftpipe.utils.logging import get_logger

log = get_logger(__name__)

#: How long a rank told to hang sleeps (the process group's timeout ends it first).
HANG_S = 3600.0


@dataclass(frozen=True)
class Faults:
    """The faults one run injects (none by default)."""

    nan_steps: frozenset[int] = frozenset()
    stop_at_step: int | None = None
    kill_at_checkpoint_step: int | None = None
    hang: tuple[int, int] | None = None  # (rank, step)
    shard_report_dir: Path | None = None

    @classmethod
    def from_config(cls, debug: DebugConfig) -> Faults:
        """The faults of a validated ``debug`` section."""
        hang = None
        if debug.hang_rank is not None and debug.hang_at_step is not None:
            hang = (debug.hang_rank, debug.hang_at_step)
        return cls(
            nan_steps=frozenset(debug.inject_nan_steps),
            stop_at_step=debug.stop_at_step,
            kill_at_checkpoint_step=debug.kill_at_checkpoint_step,
            hang=hang,
            shard_report_dir=Path(debug.shard_report_dir).expanduser() if debug.shard_report_dir else None,
        )

    def poisons(self, step: int) -> bool:
        """Whether the loss of global optimizer ``step`` (1-based) is to be made NaN."""
        return step in self.nan_steps

    def stops_after(self, step: int) -> bool:
        """Whether training is to stop after ``step`` as if a stop signal had arrived."""
        return self.stop_at_step is not None and step >= self.stop_at_step

    def checkpoint_written(self, step: int) -> None:
        """SIGKILL this process when the checkpoint of ``step`` is the one to die after (in the launcher's
        first round: the round a launcher restarts after the kill continues)."""
        from ftpipe.utils.launch import current

        if self.kill_at_checkpoint_step == step and current().restart_count == 0:
            log.warning("fault injection: killing this process after writing the checkpoint of step %d", step)
            os.kill(os.getpid(), signal.SIGKILL)

    def maybe_hang(self, rank: int, step: int) -> None:
        """Stop responding (sleep) when this rank is told to hang at ``step``."""
        if self.hang == (rank, step):
            log.warning("fault injection: rank %d stops responding at step %d", rank, step)
            time.sleep(HANG_S)


NO_FAULTS = Faults()
