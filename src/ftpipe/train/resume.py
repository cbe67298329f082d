"""Resuming: which checkpoint ``resume_from_checkpoint`` means (a path, or ``auto``: the newest
complete one), and the per-rank random states that a checkpoint carries for an exact continuation.

A checkpoint is a Lightning ``.ckpt`` file (single device, DDP) or a distributed-checkpoint folder
(FSDP1 sharded, FSDP2) that is complete once both the ``torch.distributed.checkpoint`` index
(``.metadata``, written after every shard) and Lightning's ``meta.pt`` (written last) are there.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from ftpipe.config.paths import checkpoints_dir, run_checkpoint_dirs
from ftpipe.config.schema import PipelineConfig
from ftpipe.errors import FtpipeError
from ftpipe.utils.logging import get_logger
from ftpipe.utils.world import distributed, world_size
from ftpipe.utils.world import world as this_world

log = get_logger(__name__)

AUTO = "auto"


class ResumeError(FtpipeError):
    """``resume_from_checkpoint`` names a checkpoint that is missing or incomplete."""


def is_complete(path: Path) -> bool:
    """True for a non-empty checkpoint file or a distributed-checkpoint folder with its index and meta."""
    if path.is_file():
        return path.stat().st_size > 0
    return path.is_dir() and (path / ".metadata").is_file() and (path / "meta.pt").is_file()


def newest_checkpoint(cfg: PipelineConfig) -> Path | None:
    """The most recently written complete checkpoint of this run's checkpoint folder(s), or None."""
    candidates = [p for run in run_checkpoint_dirs(cfg) for p in run.glob("*.ckpt") if is_complete(p)]
    if not candidates:
        return None

    def written(path: Path) -> float:
        return (path / "meta.pt").stat().st_mtime if path.is_dir() else path.stat().st_mtime

    return max(candidates, key=written)


def resolve_resume(cfg: PipelineConfig) -> str | None:
    """The checkpoint to resume from (None: a fresh start); a clear error for a bad explicit path.
    A distributed checkpoint's index is vetted first (torch unpickles it without limits)."""
    found = _resolve(cfg)
    if found is not None and Path(found).is_dir():
        from ftpipe.model.checkpoint import check_distributed_metadata

        check_distributed_metadata(found)
    return found


def _resolve(cfg: PipelineConfig) -> str | None:
    choice = cfg.train.resume_from_checkpoint
    if not choice:
        return None
    if choice == AUTO:
        found = newest_checkpoint(cfg)
        where = ", ".join(str(p) for p in run_checkpoint_dirs(cfg)) or str(checkpoints_dir(cfg))
        if found is None:
            log.info("resume_from_checkpoint auto: no complete checkpoint in %s, starting fresh", where)
            return None
        log.info("resume_from_checkpoint auto: resuming from %s", found)
        return str(found)
    path = Path(choice).expanduser()
    if not path.exists():
        raise ResumeError(
            f"resume_from_checkpoint: {path} does not exist; give a checkpoint file or "
            "distributed-checkpoint folder, or 'auto' for the newest one of this run"
        )
    if not is_complete(path):
        raise ResumeError(
            f"resume_from_checkpoint: {path} is incomplete (an interrupted save: no .metadata/meta.pt); "
            "give an earlier checkpoint, or 'auto' to take the newest complete one"
        )
    return str(path)


def rng_state() -> dict[str, Any]:
    """This process's random states as plain tensors, numbers and tuples (loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (
            str(kind),
            torch.from_numpy(keys.astype(np.int64)),
            int(pos),
            int(has_gauss),
            float(cached),
        ),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])


class RngStates(Callback):
    """The random-number states of every rank (torch, CUDA, numpy, python) in each checkpoint, restored
    on resume right before the first training batch, so dropout draws continue where they stopped.

    Checkpoints are written by rank 0, so the states of all ranks are gathered into its copy. A run
    resumed on a different number of ranks gives rank r the state of saved rank ``r % saved`` (and a
    warning): exact continuation needs the same world size.
    """

    def __init__(self) -> None:
        super().__init__()
        self._to_restore: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        state = rng_state()
        if distributed():
            states: list[Any] = [None] * world_size()
            dist.all_gather_object(states, state)
        else:
            states = [state]
        return {"per_rank": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict.get("per_rank") or []
        if not states:
            return
        rank, world = this_world()
        if world != len(states) and rank == 0:
            log.warning(
                "the checkpoint holds the random states of %d rank(s), this run has %d: dropout draws "
                "will differ from an uninterrupted run (exact resume needs the same number of ranks)",
                len(states),
                world,
            )
        self._to_restore = states[rank % len(states)]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._to_restore is not None:
            set_rng_state(self._to_restore)
            self._to_restore = None
