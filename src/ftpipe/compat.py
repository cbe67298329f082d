"""Lightning's and torch's private API, in one place.

ftpipe uses the public API wherever it does the job. What it cannot do without internals is here, and
only here, so that an upgrade touches one file:

* :class:`AtomicModelCheckpoint`: ``ModelCheckpoint`` whose writes go through a method of ftpipe's
  (atomic publishing) and that can save ``last`` at the final step. Lightning has no public hook for
  either: this overrides ``_save_checkpoint`` and uses ``_last_global_step_saved``,
  ``_last_checkpoint_saved``, ``_save_last_checkpoint`` and ``_monitor_candidates``.
* :class:`CPUFSDPStrategy`: Lightning's ``FSDPStrategy`` on the CPU (over gloo). It overrides
  ``_setup_model`` and calls ``lightning.pytorch.strategies.fsdp._setup_activation_checkpointing``.
* :func:`default_store`: the process group's key-value store (``torch.distributed``'s
  ``_get_default_store``), for the per-rank heartbeats.

:data:`LIGHTNING_CHECKED` names the Lightning releases these were read against; another release logs a
warning (``check_lightning_release``, called when a Trainer is built), naming this module. To widen ``lightning<2.7`` in pyproject.toml: read the internals
above in the new release, run the tests, and add the release here.
"""

from __future__ import annotations

from typing import Any
from weakref import proxy

import lightning
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy

from ftpipe.utils.logging import get_logger
from ftpipe.utils.world import in_group

log = get_logger(__name__)

#: (major, minor) releases of Lightning whose internals this module was checked against.
LIGHTNING_CHECKED = ((2, 6),)


def lightning_release() -> tuple[int, int]:
    """The installed Lightning's (major, minor)."""
    major, minor = (int(part) for part in lightning.__version__.split(".")[:2])
    return major, minor


def check_lightning_release() -> bool:
    """Whether the installed Lightning is one this module was checked against (a warning when not)."""
    release = lightning_release()
    if release in LIGHTNING_CHECKED:
        return True
    log.warning(
        "Lightning %s: ftpipe's use of its internals (ftpipe/compat.py) was checked against %s only; "
        "checkpointing and FSDP1 on the CPU may misbehave",
        lightning.__version__,
        ", ".join(f"{a}.{b}" for a, b in LIGHTNING_CHECKED),
    )
    return False


class AtomicModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose every save goes through :meth:`write_checkpoint`, and which can save
    ``last`` at the end of training (:meth:`save_last_if_unsaved`).

    Subclasses implement :meth:`write_checkpoint`; everything else is Lightning's own behaviour.
    """

    def write_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        """Write the checkpoint to ``filepath`` (every rank calls it)."""
        raise NotImplementedError

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        # ModelCheckpoint's own _save_checkpoint (lightning 2.6), with the write replaced.
        self.write_checkpoint(trainer, filepath)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def after_remove(self, trainer: pl.Trainer, filepath: str) -> None:
        """Called after ModelCheckpoint deleted one of its own checkpoints (keep-top-k, a replaced last)."""

    def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        # ModelCheckpoint's own removal (lightning 2.6), then the hook.
        super()._remove_checkpoint(trainer, filepath)
        self.after_remove(trainer, filepath)

    def save_last_if_unsaved(self, trainer: pl.Trainer) -> None:
        """Save ``last`` (with ``save_last``) when the current step has no checkpoint yet."""
        if self.save_last and trainer.global_step > 0 and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy that also runs on the CPU (over gloo).

    Lightning's accelerator connector refuses ``FSDPStrategy`` with ``accelerator="cpu"`` by an exact
    type check, which a subclass passes; and FSDP1 itself needs ``device_id=torch.device("cpu")`` when
    the module lives on the CPU ("FSDP needs a non-CPU accelerator device" otherwise), while Lightning
    passes the device index (None on the CPU). On a CUDA root device this is the unmodified strategy.
    """

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from lightning.pytorch.strategies.fsdp import _setup_activation_checkpointing
        from torch.distributed.fsdp import FullyShardedDataParallel

        already = any(isinstance(m, FullyShardedDataParallel) for m in model.modules())
        if self.root_device.type != "cpu" or already:
            return super()._setup_model(model)
        model = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model


def default_store() -> Any | None:
    """The default process group's key-value store (None without a process group, or when it has none)."""
    import torch.distributed as dist

    if not in_group():
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError):  # pragma: no cover - a group without a store
        return None
