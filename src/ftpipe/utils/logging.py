"""Rank-zero logging: records from ranks other than 0 are dropped unless they are warnings or worse."""

from __future__ import annotations

import logging
import os
import sys

_FORMAT = "%(asctime)s %(levelname)s [%(name)s%(rank_tag)s] %(message)s"


def global_rank() -> int:
    """This process's global rank: from torch.distributed when initialised, else the launcher's env."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    for var in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    local, node = os.environ.get("LOCAL_RANK"), os.environ.get("NODE_RANK", "0")
    if local is not None and local.isdigit():
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
        return int(node) * per_node + int(local) if per_node else int(local)
    return 0


class _RankFilter(logging.Filter):
    """ftpipe's records at their level, other libraries' from WARNING up; on rank 0 only, except warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        rank = global_rank()
        record.rank_tag = f" rank {rank}" if rank else ""
        if not record.name.startswith("ftpipe") and record.levelno < logging.WARNING:
            return False
        return rank == 0 or record.levelno >= logging.WARNING


def setup_logging(level: int | str = logging.INFO) -> None:
    """Install one handler on the root logger (idempotent).

    On the root, so that a library that later calls ``logging.basicConfig`` adds nothing and no record
    is printed twice; the filter keeps other libraries' chatter below WARNING out.
    """
    logging.getLogger("ftpipe").setLevel(level)
    root = logging.getLogger()
    if not any(getattr(h, "_ftpipe", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler._ftpipe = True  # type: ignore[attr-defined]
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        handler.addFilter(_RankFilter())
        root.addHandler(handler)


def get_logger(name: str) -> logging.Logger:
    """A logger under the ``ftpipe`` hierarchy (``ftpipe.data.prepare`` ...)."""
    return logging.getLogger(name if name.startswith("ftpipe") else f"ftpipe.{name}")
