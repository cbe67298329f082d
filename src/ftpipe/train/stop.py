"""Stopping on SIGTERM / SIGINT (and SIGUSR1 under SLURM) without losing work.

SageMaker (a stopped or pre-empted job: 120 s before SIGKILL), SLURM, Kubernetes and torchrun's own
shutdown send SIGTERM; Ctrl-C sends SIGINT. The handler only records the signal. At the next optimizer
step boundary the ranks agree (one all-reduce: a signal seen by any rank stops every rank at the same
step), the Trainer stops, and the checkpoint callback saves the ``last`` checkpoint of that step at the
end of training. ``train`` then reports the stop (``StoppedResumable`` on rank 0).

Schedulers signal the whole process group (``docker stop``, Kubernetes, SLURM; Ctrl-C in a terminal):
with Lightning's launcher rank 1 is rank 0's child in the same group, so every rank records the signal
itself (the all-reduce makes one rank's signal enough), and the data loader workers ignore it
(``ftpipe.data.datamodule.LoaderWorkerInit``) so that no batch is lost. The handlers are this
callback's from the start of training to its end; before ``fit`` and after it (export, evaluation)
the process has its own handlers again (Lightning's ones are not left behind: they would swallow a
SIGTERM).

Fault injection for tests: ``stop_at_step`` (the ``debug`` section) stops after that step as if a signal
had arrived then.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from ftpipe.train.faults import NO_FAULTS, Faults
from ftpipe.train.step import OptimizerStep
from ftpipe.utils.launch import current as current_launch
from ftpipe.utils.logging import get_logger

log = get_logger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: Under SLURM also SIGUSR1, the usual warning signal of a batch script (``#SBATCH --signal=USR1@120``), whose
#: default action would end the process without a checkpoint.
SLURM_STOP_SIGNALS = (*STOP_SIGNALS, signal.SIGUSR1)


#: Stop signals for which Lightning installs no handler of its own.
NOT_LIGHTNINGS = {signal.SIGUSR1}


def stop_signals() -> tuple[signal.Signals, ...]:
    """The signals that stop training in this process's launch."""
    return SLURM_STOP_SIGNALS if current_launch().cluster == "slurm" else STOP_SIGNALS


class GracefulStop(Callback):
    """Stops training at the optimizer step after a SIGTERM / SIGINT, every rank at the same step.

    Args:
        steps: the module's optimizer-step accounting (the ranks agree at its step boundaries).
        signals: the signals that stop training.
        faults: ``stop_at_step`` of the ``debug`` section stops as if a signal had arrived.

    Attributes:
        signal_name: the signal this rank received (None when none).
        stopped_at_step: the global step at which training stopped because of a signal (any rank's).
    """

    def __init__(
        self,
        steps: OptimizerStep,
        signals: tuple[signal.Signals, ...] | None = None,
        faults: Faults = NO_FAULTS,
    ) -> None:
        super().__init__()
        self.signals = stop_signals() if signals is None else signals
        self.signal_name: str | None = None
        self.stopped_at_step: int | None = None
        self._previous: dict[signal.Signals, Any] = {}
        self.steps = steps
        self.faults = faults

    def _record(self, signum: int, _frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # The handlers before Lightning installs its own (after this hook): ``teardown`` restores these.
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.getsignal(sig) for sig in self.signals}
            # Lightning leaves SIGUSR1 alone (no auto-requeue): recorded from here on, so that a warning
            # that arrives while the model loads stops training at its first step instead of ending the
            # process without a checkpoint (SIGUSR1's default action)
            for sig in set(self.signals) & NOT_LIGHTNINGS:
                signal.signal(sig, self._record)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Replaces Lightning's own SIGTERM handler for the training loop (it stops without a checkpoint).
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                previous = signal.signal(sig, self._record)
                self._previous.setdefault(sig, previous)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        if self.steps.just_completed() is None:
            return  # inside an accumulation window: not an optimizer step boundary
        if self.faults.stops_after(trainer.global_step):
            self.signal_name = f"stop_at_step={self.faults.stop_at_step}"
        if trainer.strategy.reduce_boolean_decision(self.signal_name is not None, all=False):
            self.stopped_at_step = trainer.global_step
            trainer.should_stop = True
            log.warning(
                "%s received: stopping after step %d; the last checkpoint is saved before exit",
                self.signal_name or "a stop signal (on another rank)",
                trainer.global_step,
            )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Runs after Lightning restored its own: the process leaves ``fit`` with the handlers it came with.
        if threading.current_thread() is threading.main_thread():
            for sig, handler in self._previous.items():
                if handler is not None:  # None: not set from Python; nothing to restore
                    signal.signal(sig, handler)
        self._previous.clear()
