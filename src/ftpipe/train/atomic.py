"""Atomic checkpoints, and room for them.

A checkpoint becomes visible under its name only once it is complete.

Every save writes ``<name>.tmp`` (a file, or a distributed-checkpoint folder with one shard per rank),
waits for all ranks, then swaps it in: an existing ``<name>`` (``last.ckpt`` is saved again and again)
is renamed to ``<name>.old``, ``<name>.tmp`` to ``<name>``, and only then is the old one deleted. A
crash at any point leaves either the previous complete checkpoint or the new one under the name;
leftovers (``.tmp`` / ``.old``, never ``*.ckpt``) are ignored by resume and removed at the next start
when their name is a run's own (``ftpipe.config.runs``): ftpipe never deletes by suffix alone.
Replacing the best checkpoint (keep-top-k) deletes the old one only after the new one is published.

On a cluster without a shared file system (SageMaker multi-node), each node holds the shards of its
own ranks: rank 0 publishes first, then the first rank of every other node publishes its local copy.

Fault injection for tests: ``kill_at_checkpoint_step`` (the ``debug`` section) kills every rank with
SIGKILL after the checkpoint of that global step is written but before it is published.

Before the first step, ``CheckpointRoom`` checks that the checkpoint folder is writable and has room
for two checkpoints (estimated from the trainable parameters and the AdamW state).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from ftpipe.errors import FtpipeError
from ftpipe.train.faults import NO_FAULTS, Faults
from ftpipe.utils.logging import get_logger

log = get_logger(__name__)

TMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def _swap(tmp: Path, final: Path) -> None:
    """``tmp`` -> ``final`` with the previous ``final`` kept until the new one is in place."""
    old = final.with_name(final.name + OLD_SUFFIX)
    _remove(old)
    if final.exists():
        os.replace(final, old) if final.is_file() else final.rename(old)
    os.replace(tmp, final) if tmp.is_file() else tmp.rename(final)
    _remove(old)


def remove_leftovers(folder: Path, owned: Callable[[str], bool]) -> list[str]:
    """Delete the ``.tmp`` / ``.old`` leftovers of interrupted saves in ``folder`` whose checkpoint name
    ``owned`` says is ftpipe's own (a run manifest lists its run); anything else is left alone. Returns
    the names removed."""
    if not folder.is_dir():
        return []
    leftovers = [
        p
        for p in folder.iterdir()
        if p.name.endswith((TMP_SUFFIX, OLD_SUFFIX)) and owned(p.name[: -len(TMP_SUFFIX)])
    ]
    for path in leftovers:
        _remove(path)
    return sorted(p.name for p in leftovers)


def save_atomically(
    trainer: pl.Trainer, filepath: str, weights_only: bool, faults: Faults = NO_FAULTS
) -> None:
    """``trainer.save_checkpoint`` to ``filepath`` through ``<filepath>.tmp`` and an atomic swap."""
    final = Path(filepath)
    tmp = final.with_name(final.name + TMP_SUFFIX)
    strategy = trainer.strategy
    if trainer.local_rank == 0:
        _remove(tmp)  # a leftover of an interrupted save
    strategy.barrier("ftpipe_checkpoint_begin")
    trainer.save_checkpoint(str(tmp), weights_only)
    strategy.barrier("ftpipe_checkpoint_written")
    faults.checkpoint_written(trainer.global_step)
    if trainer.is_global_zero:
        _swap(tmp, final)
    strategy.barrier("ftpipe_checkpoint_published")
    if trainer.local_rank == 0 and not trainer.is_global_zero and tmp.exists():
        _swap(tmp, final)  # this node's own copy (no shared file system)
    strategy.barrier("ftpipe_checkpoint_done")


class CheckpointStorageError(FtpipeError):
    """The checkpoint folder is not writable or too small for two checkpoints."""


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def checkpoint_bytes(module: torch.nn.Module, optimizer_states: int = 2) -> int:
    """Estimated size of one checkpoint: the trainable parameters (global sizes, also for sharded
    DTensors) plus AdamW's ``optimizer_states`` fp32 moments per parameter."""
    total = 0
    for p in module.parameters():
        if p.requires_grad:
            total += p.numel() * (p.element_size() + 4 * optimizer_states)
    return total


class CheckpointRoom(Callback):
    """Before the first step: the checkpoint folder must be writable and hold at least two checkpoints
    (the new one is written before the previous one is deleted). Checked on rank 0, the outcome
    broadcast so every rank stops together."""

    def __init__(self, folder_of: Callable[[], str | None]) -> None:
        super().__init__()
        self.folder_of = folder_of

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        problem = None
        if trainer.is_global_zero:
            problem = self.problem(Path(self.folder_of() or trainer.default_root_dir), pl_module)
        problem = trainer.strategy.broadcast(problem)
        if problem:
            raise CheckpointStorageError(problem)

    @staticmethod
    def problem(folder: Path, module: torch.nn.Module) -> str | None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
                pass
        except OSError as err:
            return (
                f"checkpoint folder {folder} is not writable ({err}); set results_dir (or checkpoint_dir) "
                "to a folder this user can write"
            )
        need = 2 * checkpoint_bytes(module)
        free = shutil.disk_usage(_existing_parent(folder)).free
        if free < need:
            return (
                f"checkpoint folder {folder}: {free / 1e9:.2f} GB free, but two checkpoints need about "
                f"{need / 1e9:.2f} GB (trainable weights and AdamW state); free some space or set "
                "results_dir (or checkpoint_dir) to a larger disk"
            )
        log.info(
            "checkpoint folder %s: %.2f GB free, a checkpoint needs about %.3f GB",
            folder,
            free / 1e9,
            need / 2e9,
        )
        return None
