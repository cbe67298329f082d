"""Where this process stands in the job: one helper for every "is there a process group?" question.

Without a process group (one process, or before the launcher has made one) ``rank()`` is 0,
``world_size()`` is 1, and the collectives below do nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch


def in_group() -> bool:
    """Whether torch.distributed has a default process group."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default group (0 without one)."""
    import torch.distributed as dist

    return dist.get_rank() if in_group() else 0


def global_rank() -> int:
    """This process's global rank: the process group's when it exists, else its launcher's."""
    from ftpipe.utils.launch import current

    return rank() if in_group() else current().rank


def world_size() -> int:
    """Processes in the default group (1 without one)."""
    import torch.distributed as dist

    return dist.get_world_size() if in_group() else 1


def local_rank() -> int:
    """This process's rank on its node, as its launcher says (:mod:`ftpipe.utils.launch`)."""
    from ftpipe.utils.launch import current

    return current().local_rank


def world() -> tuple[int, int]:
    """``(rank, world_size)``."""
    return rank(), world_size()


def distributed() -> bool:
    """Whether there are other processes to talk to (a group of more than one rank)."""
    return world_size() > 1


def all_reduce(tensor: torch.Tensor, op: Literal["sum", "max"] = "sum") -> torch.Tensor:
    """``tensor`` reduced over every rank, in place (unchanged with one process); returns it."""
    import torch.distributed as dist

    if distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor
