"""Stopping on SIGTERM / SIGINT without losing work.

SageMaker (a stopped or pre-empted job: 120 s before SIGKILL), SLURM, Kubernetes and torchrun's own
shutdown send SIGTERM; Ctrl-C sends SIGINT. The handler only records the signal. At the next optimizer
step boundary the ranks agree (one all-reduce: a signal seen by any rank stops every rank at the same
step), the Trainer stops, and the checkpoint callback saves the ``last`` checkpoint of that step at the
end of training. ``train`` then reports the stop (``StoppedResumable`` on rank 0).

Test hook: ``FTPIPE_STOP_AT_STEP=<N>`` stops after step N as if a signal had arrived then.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from ftpipe.utils.logging import get_logger

log = get_logger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
STOP_AT_ENV = "FTPIPE_STOP_AT_STEP"


class GracefulStop(Callback):
    """Stops training at the optimizer step after a SIGTERM / SIGINT, every rank at the same step.

    Attributes:
        signal_name: the signal this rank received (None when none).
        stopped_at_step: the global step at which training stopped because of a signal (any rank's).
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        super().__init__()
        self.signals = signals
        self.signal_name: str | None = None
        self.stopped_at_step: int | None = None
        self._previous: dict[signal.Signals, object] = {}
        self._checked_step = -1
        stop_at = os.environ.get(STOP_AT_ENV, "")
        self._stop_at = int(stop_at) if stop_at.isdigit() else None

    def _record(self, signum: int, _frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Replaces Lightning's own SIGTERM handler for the training loop (it stops without a checkpoint).
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._record)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        if trainer.global_step == self._checked_step:
            return  # inside an accumulation window: not an optimizer step boundary
        self._checked_step = trainer.global_step
        if self._stop_at is not None and trainer.global_step >= self._stop_at:
            self.signal_name = f"{STOP_AT_ENV}={self._stop_at}"
        if trainer.strategy.reduce_boolean_decision(self.signal_name is not None, all=False):
            self.stopped_at_step = trainer.global_step
            trainer.should_stop = True
            log.warning(
                "%s received: stopping after step %d; the last checkpoint is saved before exit",
                self.signal_name or "a stop signal (on another rank)",
                trainer.global_step,
            )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
