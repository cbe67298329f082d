"""Which accelerator runs the job, and the matching process-group backend."""

from __future__ import annotations

import torch

from ftpipe.config.schema import PipelineConfig


def accelerator_name(cfg: PipelineConfig) -> str:
    """``cuda`` when a CUDA device is visible and ``accelerator`` is not ``cpu``, else ``cpu``."""
    wanted = cfg.dist.accelerator
    if wanted == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if wanted == "cuda":
        raise RuntimeError("accelerator: 'cuda' but no CUDA device is visible (set accelerator: auto or cpu)")
    return "cpu"


def process_group_backend(cfg: PipelineConfig) -> str:
    """``nccl`` on CUDA, ``gloo`` on the CPU."""
    return "nccl" if accelerator_name(cfg) == "cuda" else "gloo"
