"""Which accelerator runs the job, and the matching process-group backend."""

from __future__ import annotations

import os

import torch

from ftpipe.config.schema import PipelineConfig
from ftpipe.config.validate import ConfigError


def accelerator_name(cfg: PipelineConfig) -> str:
    """``cuda`` when a CUDA device is visible and ``accelerator`` is not ``cpu``, else ``cpu``."""
    wanted = cfg.dist.accelerator
    if wanted == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if wanted == "cuda":
        raise ConfigError(
            ["accelerator: 'cuda' but no CUDA device is visible (set accelerator: auto or cpu)"]
        )
    return "cpu"


def process_group_backend(cfg: PipelineConfig) -> str:
    """``nccl`` on CUDA, ``gloo`` on the CPU."""
    return "nccl" if accelerator_name(cfg) == "cuda" else "gloo"


def leave_process_group() -> None:
    """Every rank together: wait for the others, then destroy the default process group.

    Called by all ranks once training is over. A rank that exits (or goes on alone) while its peers
    still hold the group makes gloo abort the peers' processes, so nobody leaves before everybody
    is done; afterwards the process can exit, or rank 0 export and evaluate alone.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    # Rank-aware logging keeps working without the group (Lightning's launcher sets no RANK).
    os.environ["RANK"] = str(dist.get_rank())
    if dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()
